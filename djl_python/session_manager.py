from handlers.sessions import Session, SessionExpired, SessionManager, SessionNotFound

__all__ = ["Session", "SessionExpired", "SessionManager", "SessionNotFound"]
