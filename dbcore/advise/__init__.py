"""Index proposals from how the app queries: the workload, candidate indexes, proof with HypoPG."""
