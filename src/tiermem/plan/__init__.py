"""``tiermem plan``: a probe of the machine, a roofline cost model, and the choice it makes for a memory limit."""
