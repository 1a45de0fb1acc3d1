//! Why a WebSocket ends: the error frame, close code, metric label and log line of each way.

use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Utf8Bytes};

use crate::admission::Denied;
use crate::protocol::Outbound;
use crate::transport::conn::is_stall;

/// Why a socket ends; decides the error frame, close code and log line.
#[derive(Debug)]
pub enum End {
    PeerClosed,
    PeerGone,
    Refused {
        code: &'static str,
        message: &'static str,
    },
    AuthTimeout,
    Idle,
    TooBig,
    /// A text frame that is not UTF-8, or another protocol violation.
    InvalidData,
    WriteStalled,
    Expired,
    Shutdown,
    /// More inbound frames than the socket's budget allows.
    Flooding,
    /// Too many refused subscriptions that look like guessing on this socket.
    TooManyFailures,
}

impl End {
    pub fn from_ws(e: WsError) -> End {
        match e {
            WsError::Io(e) if is_stall(&e) => End::WriteStalled,
            WsError::Capacity(_) => End::TooBig,
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::PeerGone,
            WsError::Utf8(_) | WsError::Protocol(_) => End::InvalidData,
            WsError::ConnectionClosed | WsError::AlreadyClosed => End::PeerClosed,
            _ => End::PeerGone,
        }
    }

    pub fn denied(d: Denied) -> End {
        End::Refused {
            code: d.code(),
            message: d.message(),
        }
    }

    /// The `{"type":"error"}` frame sent before closing, if any.
    pub fn error_frame(&self) -> Option<String> {
        let (code, message) = match self {
            End::Refused { code, message } => (*code, *message),
            End::Expired => ("auth_expired", "token expired"),
            End::Flooding => ("rate_limited", "too many frames"),
            End::TooManyFailures => ("rate_limited", "too many failed subscriptions"),
            _ => return None,
        };
        let frame = Outbound::Error {
            code,
            topic: None,
            message,
        };
        Some(frame.to_text())
    }

    pub fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::PeerClosed | End::PeerGone | End::WriteStalled => return None,
            End::Refused { .. } | End::Expired => (CloseCode::Policy, "unauthorized"),
            End::AuthTimeout => (CloseCode::Policy, "auth timeout"),
            End::Idle => (CloseCode::Normal, "idle timeout"),
            End::TooBig => (CloseCode::Size, "frame too large"),
            End::InvalidData => (CloseCode::Invalid, "invalid frame"),
            End::Shutdown => (CloseCode::Away, "server shutting down"),
            End::Flooding => (CloseCode::Policy, "too many frames"),
            End::TooManyFailures => (CloseCode::Policy, "too many failures"),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })
    }

    /// The `reason` label of `wavelog_worker_websocket_disconnects_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            End::PeerClosed => "client_closed",
            End::PeerGone => "connection_lost",
            End::Refused { .. } => "refused",
            End::AuthTimeout => "auth_timeout",
            End::Idle => "idle_timeout",
            End::TooBig => "frame_too_large",
            End::InvalidData => "invalid_frame",
            End::WriteStalled => "client_not_reading",
            End::Expired => "token_expired",
            End::Shutdown => "shutdown",
            End::Flooding => "flooding",
            End::TooManyFailures => "too_many_failures",
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            End::PeerClosed => "closed by client",
            End::PeerGone => "connection lost",
            End::Refused { code, .. } => code,
            End::AuthTimeout => "auth timeout",
            End::Idle => "idle timeout",
            End::TooBig => "frame too large",
            End::InvalidData => "invalid frame",
            End::WriteStalled => "client not reading",
            End::Expired => "token expired",
            End::Shutdown => "shutdown",
            End::Flooding => "too many frames",
            End::TooManyFailures => "too many failed subscriptions",
        }
    }
}
