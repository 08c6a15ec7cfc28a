//! The turn journal: each step of a turn, keyed by (agent, waking event, step), in sled.
//!
//! A turn interrupted by a crash runs again from the wake queue; with the journal it replays
//! the steps it had finished (the model's reply and every tool result recorded) instead of
//! asking the model again and repeating tool calls. A tool call runs only after its step is
//! saved and flushed, and its result is flushed before the next call, so a finished call is
//! never run twice. Entries are removed when the wake is finished.

use ruma::UserId;

use super::llm_turn::{JournaledStep, StepJournal};
use crate::store::{Store, StoreError, Tree};

/// All turns' steps.
#[derive(Clone)]
pub struct TurnJournal {
    store: Store,
    steps: Tree<String, JournaledStep>,
}

impl TurnJournal {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            steps: store.tree("turn_journal")?,
        })
    }

    /// The journal of the turn that answers `event_id` for `agent`.
    pub fn for_wake(&self, agent: &UserId, event_id: &str) -> WakeJournal {
        WakeJournal {
            journal: self.clone(),
            prefix: Self::prefix(agent, event_id),
        }
    }

    /// Forgets a finished wake's steps.
    pub fn forget(&self, agent: &UserId, event_id: &str) -> Result<(), StoreError> {
        let prefix = Self::prefix(agent, event_id);
        let keys: Vec<sled::IVec> = self
            .steps
            .raw()
            .scan_prefix(prefix.as_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        self.steps.raw().apply_batch(batch)?;
        Ok(())
    }

    fn prefix(agent: &UserId, event_id: &str) -> String {
        format!("{agent}\u{0}{event_id}\u{0}")
    }
}

/// One wake's steps.
pub struct WakeJournal {
    journal: TurnJournal,
    prefix: String,
}

impl WakeJournal {
    fn key(&self, step: usize) -> String {
        format!("{}{step:04}", self.prefix)
    }
}

#[async_trait::async_trait]
impl StepJournal for WakeJournal {
    async fn load(&self, step: usize) -> Result<Option<JournaledStep>, StoreError> {
        self.journal.steps.get(&self.key(step))
    }

    async fn save(&self, step: usize, entry: &JournaledStep) -> Result<(), StoreError> {
        self.journal.steps.insert(&self.key(step), entry)?;
        self.journal.store.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Message;

    #[tokio::test]
    async fn steps_are_kept_per_wake_and_forgotten_together() {
        let store = Store::temporary().unwrap();
        let journal = TurnJournal::open(&store).unwrap();
        let agent = UserId::parse("@crew_alice:example.org").unwrap();
        let one = journal.for_wake(&agent, "$one");
        let two = journal.for_wake(&agent, "$two");
        let entry = JournaledStep {
            reply: Message::assistant("done"),
            results: vec!["ok".into()],
            tokens: 12,
            prompt_tokens: 10,
        };
        one.save(0, &entry).await.unwrap();
        one.save(1, &entry).await.unwrap();
        two.save(0, &entry).await.unwrap();
        assert_eq!(one.load(1).await.unwrap(), Some(entry.clone()));
        assert_eq!(one.load(2).await.unwrap(), None);
        journal.forget(&agent, "$one").unwrap();
        assert_eq!(one.load(0).await.unwrap(), None);
        assert_eq!(two.load(0).await.unwrap(), Some(entry));
    }
}
