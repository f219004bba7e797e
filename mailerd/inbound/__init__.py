"""Checks of the mail that arrives from other servers (on the network listeners): SPF of the
envelope sender (`sender_policy`), the DKIM signatures (`signatures`), DMARC over both
(`dmarc`), and the Authentication-Results header that records them (`results`). `verifier`
runs them for a finished message, in a worker, over the worker's DNS (`lookups`: the
asynchronous resolver with a TTL cache, and a bridge for the libraries that ask synchronously
from a thread), within --dns-timeout. `blocklists` looks the client's address up in the
--dnsbl zones, at its connect, over the same DNS.
"""
