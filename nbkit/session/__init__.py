"""A session: one subject's folder on Drive (or a local disk) and everything kept in it.

`core` creates, opens, lists and moves sessions; `store` writes into them atomically; `manifest` is
`session.json`; `lock` keeps one kernel per session; `settings` holds the training settings stored there.
"""
