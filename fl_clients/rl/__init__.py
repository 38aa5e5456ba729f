"""Reinforcement-learning agents for the edge-cloud twin (paper 001 §4.1-4.3).

* :mod:`fl_clients.rl.spec`: the task settings every client receives
  (:class:`RLSpec`), the twin scenario they imply (faults, shield, episode
  length) and the observation's forecaster;
* :mod:`fl_clients.rl.ppo`: the Edge Service Agent, clipped PPO with GAE on
  one edge site (:class:`edgesim.envs.EdgeSiteEnv`), TorchRL's losses;
* :mod:`fl_clients.rl.qmix`: the Cluster Orchestrator Agent, QMIX (or VDN)
  on one cluster (:class:`edgesim.envs.ClusterParallelEnv`);
* :mod:`fl_clients.rl.deploy`: learned agents as twin controllers, and the
  system-level evaluation episode the server scores every round.

The Flower handlers are in :mod:`fl_clients.rl_client`; the server side is
:mod:`fl_server.rl_experiment`.
"""
