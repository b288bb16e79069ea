"""peagle: a trainer for P-EAGLE (parallel-drafting EAGLE-3) draft heads."""

__version__ = "0.1.0"
