"""The cluster: peer authentication, membership, the location directory, placement."""
