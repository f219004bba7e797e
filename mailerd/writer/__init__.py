"""The mailbox writer: the one process that keeps root after the start, and writes users'
mailboxes (owned by them) under lockf. Started by the delivery process before it drops its
privileges; nothing unprivileged imports this package (its clients speak to it over a channel:
`ipc.writer_client`)."""
