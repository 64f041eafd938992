"""nlbench: a Ray-distributed continual-learning benchmark for Nested Learning.

Does Hope forget less than Transformer and Titans when it learns a stream of tasks, at what
cost in speed, and with which CMS frequencies and M3 momentum scales?
"""

__version__ = "0.1.0"
