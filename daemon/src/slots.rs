//! Counted places, per key and in all: uploads in flight, open event
//! streams. A place is taken against both caps and given back when its
//! [`Slot`] drops; a key's entry exists only while it holds a place, so the
//! map is bounded by the places held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Slots {
    held: Arc<Mutex<(usize, HashMap<String, usize>)>>,
}

/// Why no place was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    /// The key already holds this many places (its cap).
    Key(usize),
    /// Every place is taken.
    All,
}

/// A place held by a key; given back when dropped.
pub struct Slot {
    slots: Slots,
    key: String,
}

impl Slots {
    /// Takes a place for `key`, at most `per_key` for one key and `total`
    /// in all (0: no cap).
    pub fn take(&self, key: &str, per_key: usize, total: usize) -> Result<Slot, Full> {
        let mut guard = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (all, per) = &mut *guard;
        let mine = per.get(key).copied().unwrap_or(0);
        if per_key > 0 && mine >= per_key {
            return Err(Full::Key(mine));
        }
        if total > 0 && *all >= total {
            return Err(Full::All);
        }
        *all += 1;
        per.insert(key.to_owned(), mine + 1);
        Ok(Slot {
            slots: self.clone(),
            key: key.to_owned(),
        })
    }

    /// Places held now, in all.
    pub fn held(&self) -> usize {
        self.held.lock().map(|h| h.0).unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        let (all, per) = &mut *guard;
        *all = all.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_capped_per_key_and_in_all_and_given_back() {
        let s = Slots::default();
        let a1 = s.take("a", 2, 3).expect("a's first");
        let _a2 = s.take("a", 2, 3).expect("a's second");
        assert_eq!(s.take("a", 2, 3).err(), Some(Full::Key(2)));
        let _b1 = s.take("b", 2, 3).expect("b's first");
        assert_eq!(s.take("c", 2, 3).err(), Some(Full::All));
        assert_eq!(s.held(), 3);
        drop(a1);
        assert_eq!(s.held(), 2);
        let _c1 = s.take("c", 2, 3).expect("a place came back");
        assert_eq!(s.take("d", 2, 3).err(), Some(Full::All), "full again");
        let unlimited = Slots::default();
        let many: Vec<Slot> = (0..100)
            .map(|_| unlimited.take("k", 0, 0).expect("no caps"))
            .collect();
        assert_eq!(unlimited.held(), 100);
        drop(many);
        assert_eq!(unlimited.held(), 0);
        assert!(
            unlimited.held.lock().expect("lock").1.is_empty(),
            "no entry for a key holding nothing"
        );
    }
}
