"""What crosses between mailerd's processes, and nothing else: the channel (frames over a Unix
socket, descriptors alongside), the messages sent over it, the table of open sessions the master
shares with its workers, and the maildrop through which `sendmail` hands mail to the daemon.
Every process may import this package; it imports no process's package."""
