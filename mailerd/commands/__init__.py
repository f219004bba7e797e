"""The commands people run, beside the daemon: `mailerd queue`, `sendmail` (also as `mailq`
and `newaliases`). Each is a short-lived process of whoever runs it (any user, for sendmail):
none of them imports the daemon's process packages, and sendmail only modules that need
nothing beyond the standard library."""
