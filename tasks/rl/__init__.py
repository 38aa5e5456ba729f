"""Reinforcement-learning agents for the edge-cloud twin (paper 001 §4.1-4.3).

* :mod:`tasks.rl.spec`: the task settings every client receives
  (:class:`RLSpec`), the twin scenario they imply (faults, shield, episode
  length) and the observation's forecaster;
* :mod:`tasks.rl.ppo`: the Edge Service Agent, clipped PPO with GAE on
  one edge site (:class:`edgesim.envs.EdgeSiteEnv`), TorchRL's losses;
* :mod:`tasks.rl.qmix`: the Cluster Orchestrator Agent, QMIX (or VDN)
  on one cluster (:class:`edgesim.envs.ClusterParallelEnv`);
* :mod:`tasks.rl.coa`: the learned COAs (``task.control.coa: qmix``), a QMIX
  team of every cluster's COA deciding every k steps next to the ESAs;
* :mod:`tasks.rl.deploy`: learned agents as twin controllers, and the
  system-level evaluation episode the server scores every round.

The Flower handlers are in :class:`tasks.rl.task.RLTask`; the server side is
:mod:`tasks.rl.server`.
"""
