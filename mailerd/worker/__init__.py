"""A worker process (unprivileged): accepts on the listeners the master opened and runs many
SMTP sessions at once, each a sans-I/O `smtp.Session` behind an asyncio protocol; a finished
message is committed through the delivery process, or straight to the mailbox writer when every
recipient is local."""
