"""instant-key-worker: booking events in, delivered Seam Instant Keys out, deleted at expiry."""
