"""The security suite: each test reproduces one attack (issue 20) against real processes, real
files and a real registry, and checks that it is refused. Every one of them failed on the code
before the fix."""
