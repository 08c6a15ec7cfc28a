//! The appservice core against a real Synapse and the real `crew` binary.

#[path = "support/tools.rs"]
mod tools;
#[path = "support/synapse.rs"]
mod synapse;
#[path = "support/crew.rs"]
mod crew;

use std::time::Duration;

use crew::CrewEnv;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn manager_greets_admin_and_acknowledges_a_mention() {
    let env = CrewEnv::start().await;
    let admin = env.admin().await;
    let manager = env.manager_id();
    // On first start the Manager opens a DM with the admin. The admin registered after crew
    // started, but the invite waits for them.
    let dm = tools::wait_for("the Manager's DM invite", WAIT, || async {
        admin.invites().await.into_iter().next()
    })
    .await;
    admin.join(&dm).await;
    let greeting = tools::wait_for("the greeting", WAIT, || async {
        admin.messages_from(&dm, &manager).await.into_iter().next()
    })
    .await;
    assert!(greeting["content"]["body"].as_str().unwrap().contains("Manager"));
    assert!(greeting["content"]["m.mentions"]["user_ids"][0] == admin.user_id.as_str());

    // A group room: invite the Manager, it joins, a mention gets an acknowledgement naming us.
    let room = admin.create_room("project", &[&manager]).await;
    tools::wait_for("the Manager to join", WAIT, || async {
        let member = admin.membership(&room, &manager).await?;
        (member["membership"] == "join").then_some(())
    })
    .await;
    admin.send(&room, json!({"msgtype": "m.text", "body": "nobody is mentioned here", "m.mentions": {}})).await;
    let asked = admin.send_mention(&room, "are you there?", &[&manager]).await;
    let ack = tools::wait_for("the acknowledgement", WAIT, || async {
        admin.messages_from(&room, &manager).await.into_iter().next()
    })
    .await;
    let body = ack["content"]["body"].as_str().unwrap();
    assert!(body.contains("admin"), "the acknowledgement names the sender: {body}");
    assert_eq!(ack["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], asked.as_str());
    // Only the mention was answered.
    assert_eq!(admin.messages_from(&room, &manager).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_strangers_invite_is_declined_with_a_reason() {
    let env = CrewEnv::start().await;
    let stranger = env.synapse.register_user("stranger").await;
    let manager = env.manager_id();
    let room = stranger.create_room("spam", &[&manager]).await;
    let member = tools::wait_for("the Manager to decline", WAIT, || async {
        let member = stranger.membership(&room, &manager).await?;
        (member["membership"] == "leave").then_some(member)
    })
    .await;
    let reason = member["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("admins"), "decline says why: {member}");
}
