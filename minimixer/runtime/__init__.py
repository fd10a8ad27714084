"""How the commands run, not what they compute: the thread pool (threads), glibc's allocator
settings (allocator) and MPI data parallelism (distributed)."""
