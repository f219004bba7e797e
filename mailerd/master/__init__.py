"""The master (root): binds every endpoint, forks the delivery process and the workers,
restarts children that die, reloads on SIGHUP, and stops everything in order. `startup.run` is
where mailerd starts; `arbiter.Master` supervises."""
