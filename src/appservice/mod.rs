//! What the homeserver calls: the appservice API (transactions, user and alias queries, ping).
