//! What we call on the homeserver: a small client acting as any of our puppeted users.
//!
//! Every request carries the appservice's `as_token`; requests on behalf of an agent add
//! `user_id=<agent>` (masquerading). Not for: receiving events (that is [`crate::appservice`]).

mod client;
mod error;
pub mod message;

pub use client::{
    CreateRoom, DeviceIdentity, MatrixClient, RoomMember, UploadedMedia, creators_are_privileged,
    honour_retry_after, power_level_users,
};
pub use error::MatrixError;
pub use message::OutgoingMessage;
