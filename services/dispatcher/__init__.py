"""The dispatcher: consumes jobs, checks the cache, routes each job to its backend."""
