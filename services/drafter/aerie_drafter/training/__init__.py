"""Training an EAGLE-3 / 3.1 head for a target model.

    data.py      ShareGPT conversations, the chat template, self-distillation, the draft vocabulary
    features.py  the target's captured hidden states and labels, on the fly or cached on disk
    ttt.py       the head unrolled for K draft steps (training-time test) and its loss

The command that ties them together is ``python -m aerie_drafter.train`` (train.py).
"""
