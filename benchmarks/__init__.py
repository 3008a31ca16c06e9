"""Speed benchmarks: compiled models against hand-written Pyro models of the same objective."""
