"""One narrow Protocol per storage domain; :class:`vault.store.base.Store` is their sum."""
