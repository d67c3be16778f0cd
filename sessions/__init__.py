"""Agent sessions: conversation state, the event log, incremental rendering, the session manager.

Sans-I/O and tensor-free: nothing here touches a socket or a tensor, so the state machine and the
log are tested directly. Persistence goes through the `SessionStore` seam.
"""
from __future__ import annotations

from sessions.event_log import EventLog, ResumeWindowExpired
from sessions.render import IncrementalRenderer
from sessions.session import Session, SessionState, TransitionError

__all__ = ["EventLog", "IncrementalRenderer", "ResumeWindowExpired", "Session", "SessionState", "TransitionError"]
