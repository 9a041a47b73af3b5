"""Alarm notifications: `policy` (pure routing, escalation, rate limits) and `worker` (its outbox cursor and the
Apprise sink in gateway/sinks/notify.py)."""
