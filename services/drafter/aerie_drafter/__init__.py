"""The drafter service: runs an EAGLE 3.1 head that proposes draft trees to the verifier."""
