"""DQN + first-order MAML allocators in the edge-cloud twin (paper 002, issue 17).

* :mod:`tasks.metarl.spec`: settings (:class:`MetaSpec`) and workload regimes;
* :mod:`tasks.metarl.fomaml`: first-order MAML, hand-written (why: its docstring);
* :mod:`tasks.metarl.dqn`: the 3 x 128 Q-network, TorchRL DQN loss / replay /
  target network, a round of FOMAML or reactive DQN, adaptation to an unseen
  regime and steps to stable return;
* :mod:`tasks.metarl.task` / :mod:`tasks.metarl.server`: the Flower sides.
"""
