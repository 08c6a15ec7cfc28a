//! What we call on the homeserver: a small client acting as any of our puppeted users.
