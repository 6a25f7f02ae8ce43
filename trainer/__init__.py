"""The training loop's components, each behind a small interface (torchtitan's split):
typed configs (``config``), checkpoints (``checkpoint``), preemption and early stops
(``preemption``), and metrics (``metrics``). ``train.py`` wires them into the loop."""
