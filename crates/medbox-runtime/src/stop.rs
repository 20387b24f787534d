//! Stop strings. Generated text passes through a `StopMatcher`, which
//! releases only text that can no longer become part of a stop string: a
//! suffix that is a prefix of some stop string is held back until the next
//! piece settles it. When a stop string completes, the text before it is
//! released and the stop string itself never is.

pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// All text seen so far.
    text: String,
    /// Bytes of `text` already released.
    released: usize,
}

/// What to do with a new piece of text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StopOutcome {
    /// Text safe to send now.
    pub release: String,
    /// A stop string completed; generation ends.
    pub stopped: bool,
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|stop| !stop.is_empty()).collect(),
            text: String::new(),
            released: 0,
        }
    }

    pub(crate) fn push(&mut self, piece: &str) -> StopOutcome {
        self.text.push_str(piece);
        // A stop cannot start before `released`: any earlier start would have
        // been a held-back prefix.
        let unreleased = &self.text[self.released..];
        let earliest_stop = self
            .stops
            .iter()
            .filter_map(|stop| unreleased.find(stop.as_str()))
            .min();
        if let Some(start) = earliest_stop {
            let release = unreleased[..start].to_string();
            self.released = self.text.len();
            return StopOutcome {
                release,
                stopped: true,
            };
        }
        let hold = self.held_back_length();
        let end = self.text.len() - hold;
        let release = self.text[self.released..end].to_string();
        self.released = end;
        StopOutcome {
            release,
            stopped: false,
        }
    }

    /// The held-back text, released when generation ends for another reason.
    pub(crate) fn flush(&mut self) -> String {
        let rest = self.text[self.released..].to_string();
        self.released = self.text.len();
        rest
    }

    /// Length in bytes of the longest unreleased suffix that is a proper
    /// prefix of some stop string.
    fn held_back_length(&self) -> usize {
        let unreleased = &self.text[self.released..];
        let longest_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        let limit = unreleased.len().min(longest_stop.saturating_sub(1));
        (1..=limit)
            .rev()
            .filter(|&length| unreleased.is_char_boundary(unreleased.len() - length))
            .find(|&length| {
                let suffix = &unreleased[unreleased.len() - length..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and renders each outcome as `release` or `release|STOP`,
    /// then the flushed rest as `flush:rest`.
    fn check(stops: &[&str], pieces: &[&str], expect: &[&str]) {
        let mut matcher = StopMatcher::new(stops.iter().map(|stop| stop.to_string()).collect());
        let mut seen = Vec::new();
        for piece in pieces {
            let outcome = matcher.push(piece);
            if outcome.stopped {
                seen.push(format!("{}|STOP", outcome.release));
                break;
            }
            seen.push(outcome.release);
        }
        if !seen.last().is_some_and(|last| last.ends_with("|STOP")) {
            seen.push(format!("flush:{}", matcher.flush()));
        }
        assert_eq!(seen, expect);
    }

    #[test]
    fn no_stops_releases_everything() {
        check(&[], &["a", "b"], &["a", "b", "flush:"]);
    }

    #[test]
    fn stop_inside_one_piece() {
        check(&["END"], &["abcENDxyz"], &["abc|STOP"]);
    }

    #[test]
    fn stop_across_pieces_is_held_back_then_dropped() {
        check(
            &["END"],
            &["ab", "cE", "N", "Dx"],
            &["ab", "c", "", "|STOP"],
        );
    }

    #[test]
    fn false_alarm_is_released_later() {
        check(&["END"], &["aE", "Nb", "c"], &["a", "ENb", "c", "flush:"]);
    }

    #[test]
    fn held_prefix_is_flushed_at_the_end() {
        check(&["END"], &["aEN"], &["a", "flush:EN"]);
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        check(&["xyz", "b"], &["axyzb"], &["a|STOP"]);
        check(&["\n\n", "。"], &["发热", "。随访"], &["发热", "|STOP"]);
    }

    #[test]
    fn multibyte_stop_prefix_is_held_on_char_boundaries() {
        check(
            &["随访："],
            &["请", "随", "访", "：一周"],
            &["请", "", "", "|STOP"],
        );
        check(&["随访："], &["请随", "便"], &["请", "随便", "flush:"]);
    }
}
