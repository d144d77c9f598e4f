from handlers.sessions import (HEADER_SAGEMAKER_CLOSED_SESSION_ID, HEADER_SAGEMAKER_SESSION_ID,
                               close_session, create_session, get_session,
                               session_non_stream_output_formatter)

__all__ = ["HEADER_SAGEMAKER_CLOSED_SESSION_ID", "HEADER_SAGEMAKER_SESSION_ID", "close_session",
           "create_session", "get_session", "session_non_stream_output_formatter"]
