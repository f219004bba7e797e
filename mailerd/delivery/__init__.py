"""The delivery process (unprivileged): commits messages that have a remote recipient (queue
first, then the local copies through the mailbox writer), hands workers their own channel to
the writer, takes `sendmail`'s mail from the maildrop, and works the outbound queue: MX lookups,
SMTP relay, retries and bounces."""
