//! Maintenance windows: a weekly schedule set on a site or a client (days, a start time,
//! a duration, a time zone), whether it is open at a moment, and when it next opens.
//! Outside its window an agent is not started on a `promote` or `targeted` rollout
//! (`dispatch::decide` asks `Window::at`); the schedule is stored as its JSON form.

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The longest window: a week (every day of a week-long window is always open).
const MAX_DURATION_MS: i64 = 7 * 24 * 3_600_000;

pub(crate) const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// The names of the time zones a window may be in, for the API's document.
pub(crate) fn time_zones() -> Vec<String> {
    jiff::tz::db()
        .available()
        .map(|name| name.as_str().to_owned())
        .collect()
}

/// A schedule as operators write it and as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowSpec {
    /// The days it opens, `mon` to `sun`.
    #[schema(example = json!(["mon", "tue", "wed", "thu", "fri"]), schema_with = crate::api::openapi::days)]
    pub(crate) days: Vec<String>,
    /// When it opens on those days, `HH:MM` in its time zone.
    #[schema(example = "02:00", schema_with = crate::api::openapi::time_of_day)]
    pub(crate) start: String,
    /// How long it stays open (`90m`, `3h`; at most 7 days).
    #[schema(example = "3h", schema_with = crate::api::openapi::window_duration)]
    pub(crate) duration: String,
    /// An IANA time zone name (`Europe/Berlin`, `UTC`).
    #[schema(example = "Europe/Berlin", schema_with = crate::api::openapi::time_zone)]
    pub(crate) time_zone: String,
}

/// A checked schedule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Window {
    /// Monday first.
    days: [bool; 7],
    start: Time,
    duration_ms: i64,
    zone: TimeZone,
    spec: WindowSpec,
}

/// Whether a window is open at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Openness {
    /// Open; it closes at this moment (ms since the epoch).
    Open { closes_at_ms: i64 },
    /// Closed; it next opens at this moment.
    Closed { opens_at_ms: i64 },
}

impl WindowSpec {
    /// Checks the schedule; the error says what is wrong, for an operator.
    pub(crate) fn check(&self) -> Result<Window, String> {
        let mut days = [false; 7];
        if self.days.is_empty() {
            return Err("a maintenance window needs at least one day".into());
        }
        for day in &self.days {
            let index = DAY_NAMES
                .iter()
                .position(|name| name.eq_ignore_ascii_case(day.trim()))
                .ok_or_else(|| {
                    format!("{day:?} is not a day: use mon, tue, wed, thu, fri, sat or sun")
                })?;
            days[index] = true;
        }
        let start = parse_start(&self.start)?;
        let duration = humantime::parse_duration(self.duration.trim())
            .map_err(|err| format!("duration {:?}: {err}", self.duration))?;
        let duration_ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        if !(60_000..=MAX_DURATION_MS).contains(&duration_ms) {
            return Err(format!(
                "duration {:?} must be between 1 minute and 7 days",
                self.duration
            ));
        }
        let zone = TimeZone::get(self.time_zone.trim())
            .map_err(|_| format!("{:?} is not a known time zone", self.time_zone))?;
        let spec = WindowSpec {
            days: DAY_NAMES
                .iter()
                .zip(days)
                .filter(|(_, on)| *on)
                .map(|(name, _)| (*name).to_owned())
                .collect(),
            start: format!("{:02}:{:02}", start.hour(), start.minute()),
            duration: humantime::format_duration(duration).to_string(),
            time_zone: self.time_zone.trim().to_owned(),
        };
        Ok(Window {
            days,
            start,
            duration_ms,
            zone,
            spec,
        })
    }
}

fn parse_start(text: &str) -> Result<Time, String> {
    let bad = || format!("start {text:?} is not a time of day as HH:MM");
    let (hour, minute) = text.trim().split_once(':').ok_or_else(bad)?;
    let hour: i8 = hour.parse().map_err(|_| bad())?;
    let minute: i8 = minute.parse().map_err(|_| bad())?;
    Time::new(hour, minute, 0, 0).map_err(|_| bad())
}

impl Window {
    /// Reads a stored schedule.
    pub(crate) fn from_json(text: &str) -> Result<Window, String> {
        let spec: WindowSpec = serde_json::from_str(text).map_err(|err| err.to_string())?;
        spec.check()
    }

    /// The normalised schedule (days in week order, `HH:MM`, the duration as written by
    /// the server).
    pub(crate) fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    /// The stored form.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(&self.spec).unwrap_or_default()
    }

    /// Whether it is open at `now_ms`, and until or from when. Openings are the start
    /// time on each chosen day in the window's zone (a start inside a daylight-saving gap
    /// moves forward with the clock); a window may run past midnight.
    pub(crate) fn at(&self, now_ms: i64) -> Openness {
        let Ok(now) = Timestamp::from_millisecond(now_ms) else {
            return Openness::Open {
                closes_at_ms: now_ms,
            };
        };
        let today = now.to_zoned(self.zone.clone()).date();
        let mut closes_at: Option<i64> = None;
        let mut opens_at: Option<i64> = None;
        // A window lasts at most a week, so openings from eight days back can still be
        // open; the next opening is at most a week ahead.
        for offset in -8..=8_i64 {
            let Some(opening) = self.opening_on(today, offset) else {
                continue;
            };
            let closing = opening.saturating_add(self.duration_ms);
            if opening <= now_ms && now_ms < closing {
                closes_at = Some(closes_at.map_or(closing, |at| at.max(closing)));
            } else if opening > now_ms {
                opens_at = Some(opens_at.map_or(opening, |at| at.min(opening)));
            }
        }
        match (closes_at, opens_at) {
            (Some(closes_at_ms), _) => Openness::Open { closes_at_ms },
            (None, Some(opens_at_ms)) => Openness::Closed { opens_at_ms },
            // Unreachable with at least one day; never hold an agent on a broken zone.
            (None, None) => Openness::Open {
                closes_at_ms: now_ms,
            },
        }
    }

    fn opening_on(&self, today: Date, offset: i64) -> Option<i64> {
        let day = today.checked_add(Span::new().days(offset)).ok()?;
        if !self.days[weekday_index(day.weekday())] {
            return None;
        }
        let zoned = day
            .to_datetime(self.start)
            .to_zoned(self.zone.clone())
            .ok()?;
        Some(zoned.timestamp().as_millisecond())
    }
}

/// When a stored window (its JSON) next opens, if it is closed at `now_ms`. A stored
/// window that does not read holds nobody: it was checked when it was set.
pub(crate) fn closed_until(window: Option<&str>, now_ms: i64) -> Option<i64> {
    match Window::from_json(window?).ok()?.at(now_ms) {
        Openness::Closed { opens_at_ms } => Some(opens_at_ms),
        Openness::Open { .. } => None,
    }
}

/// The window that governs an agent: its site's, or else its client's.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AgentWindow {
    /// `site` or `client`.
    pub(crate) scope: &'static str,
    pub(crate) window: Window,
}

impl AgentWindow {
    pub(crate) fn of(site: Option<&str>, client: Option<&str>) -> Option<AgentWindow> {
        let (scope, json) = match (site, client) {
            (Some(json), _) => ("site", json),
            (None, Some(json)) => ("client", json),
            (None, None) => return None,
        };
        match Window::from_json(json) {
            Ok(window) => Some(AgentWindow { scope, window }),
            Err(err) => {
                tracing::warn!(%err, scope, "a stored maintenance window does not read; it holds nobody");
                None
            }
        }
    }

    /// Why the agent waits, if its window is closed at `now_ms`.
    pub(crate) fn holds(&self, now_ms: i64) -> Option<String> {
        let Openness::Closed { opens_at_ms } = self.window.at(now_ms) else {
            return None;
        };
        let spec = self.window.spec();
        Some(format!(
            "outside the maintenance window of its {} ({} {} for {}, {}); waiting for the window opening at {}",
            self.scope,
            spec.days.join(","),
            spec.start,
            spec.duration,
            spec.time_zone,
            crate::clock::rfc3339(opens_at_ms)
        ))
    }
}

fn weekday_index(day: Weekday) -> usize {
    usize::try_from(day.to_monday_zero_offset()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: &[&str], start: &str, duration: &str, zone: &str) -> Window {
        WindowSpec {
            days: days.iter().map(|d| (*d).to_owned()).collect(),
            start: start.into(),
            duration: duration.into(),
            time_zone: zone.into(),
        }
        .check()
        .expect("valid window")
    }

    fn ms(text: &str) -> i64 {
        text.parse::<Timestamp>()
            .expect("timestamp")
            .as_millisecond()
    }

    #[test]
    fn open_inside_and_closed_outside_with_the_next_opening() {
        // Weekdays 02:00-05:00 in Berlin (UTC+1 in winter). 2026-11-30 is a Monday.
        let w = window(
            &["mon", "tue", "wed", "thu", "fri"],
            "02:00",
            "3h",
            "Europe/Berlin",
        );
        assert_eq!(
            w.at(ms("2026-11-30T01:30:00Z")),
            Openness::Open {
                closes_at_ms: ms("2026-11-30T04:00:00Z")
            }
        );
        assert_eq!(
            w.at(ms("2026-11-30T04:00:00Z")),
            Openness::Closed {
                opens_at_ms: ms("2026-12-01T01:00:00Z")
            }
        );
        // Saturday: the next opening is Monday's.
        assert_eq!(
            w.at(ms("2026-12-05T12:00:00Z")),
            Openness::Closed {
                opens_at_ms: ms("2026-12-07T01:00:00Z")
            }
        );
    }

    #[test]
    fn a_window_runs_past_midnight_into_a_day_not_listed() {
        let w = window(&["sat"], "22:00", "4h", "UTC");
        // 2026-12-06 is a Sunday; Saturday's window is still open at 01:00.
        assert!(matches!(
            w.at(ms("2026-12-06T01:00:00Z")),
            Openness::Open { .. }
        ));
        assert!(matches!(
            w.at(ms("2026-12-06T02:00:00Z")),
            Openness::Closed { .. }
        ));
    }

    #[test]
    fn daylight_saving_moves_the_utc_opening() {
        let w = window(&["sun"], "03:00", "1h", "Europe/Berlin");
        // Summer (UTC+2): 01:00Z; winter (UTC+1): 02:00Z.
        assert_eq!(
            w.at(ms("2026-07-04T12:00:00Z")),
            Openness::Closed {
                opens_at_ms: ms("2026-07-05T01:00:00Z")
            }
        );
        assert_eq!(
            w.at(ms("2026-12-05T12:00:00Z")),
            Openness::Closed {
                opens_at_ms: ms("2026-12-06T02:00:00Z")
            }
        );
    }

    #[test]
    fn every_day_for_a_week_is_always_open() {
        let w = window(&["mon"], "00:00", "7d", "UTC");
        for at in [
            "2026-11-30T00:00:00Z",
            "2026-12-03T13:00:00Z",
            "2026-12-06T23:59:00Z",
        ] {
            assert!(matches!(w.at(ms(at)), Openness::Open { .. }), "{at}");
        }
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let spec = |days: &[&str], start: &str, duration: &str, zone: &str| {
            WindowSpec {
                days: days.iter().map(|d| (*d).to_owned()).collect(),
                start: start.into(),
                duration: duration.into(),
                time_zone: zone.into(),
            }
            .check()
            .unwrap_err()
        };
        assert!(spec(&[], "02:00", "1h", "UTC").contains("at least one day"));
        assert!(spec(&["funday"], "02:00", "1h", "UTC").contains("not a day"));
        assert!(spec(&["mon"], "25:00", "1h", "UTC").contains("HH:MM"));
        assert!(spec(&["mon"], "2pm", "1h", "UTC").contains("HH:MM"));
        assert!(spec(&["mon"], "02:00", "8d", "UTC").contains("between 1 minute and 7 days"));
        assert!(spec(&["mon"], "02:00", "soon", "UTC").contains("duration"));
        assert!(spec(&["mon"], "02:00", "1h", "Mars/Olympus").contains("time zone"));
    }

    #[test]
    fn a_sites_window_wins_over_its_clients_and_says_when_it_opens() {
        let site = window(&["sat"], "22:00", "1h", "UTC").to_json();
        let client = window(&["mon"], "02:00", "1h", "Europe/Berlin").to_json();
        let of = AgentWindow::of(Some(&site), Some(&client)).expect("a window");
        assert_eq!(of.scope, "site");
        let reason = of.holds(ms("2026-12-05T12:00:00Z")).expect("closed");
        assert!(
            reason.ends_with("waiting for the window opening at 2026-12-05T22:00:00.000Z"),
            "{reason}"
        );
        assert!(of.holds(ms("2026-12-05T22:30:00Z")).is_none());
        let of = AgentWindow::of(None, Some(&client)).expect("the client's window");
        assert_eq!(of.scope, "client");
        assert!(AgentWindow::of(None, None).is_none());
        // A stored window that does not read holds nobody.
        assert!(AgentWindow::of(Some("{not json"), None).is_none());
        assert_eq!(closed_until(Some("{not json"), 0), None);
        assert_eq!(
            closed_until(Some(&site), ms("2026-12-05T12:00:00Z")),
            Some(ms("2026-12-05T22:00:00Z"))
        );
    }

    #[test]
    fn the_stored_form_is_normalised_and_reads_back() {
        let w = window(&["FRI", "mon", "mon"], "2:5", "90m", "Europe/Berlin");
        assert_eq!(w.spec().days, vec!["mon", "fri"]);
        assert_eq!(w.spec().start, "02:05");
        assert_eq!(w.spec().duration, "1h 30m");
        let back = Window::from_json(&w.to_json()).expect("reads back");
        assert_eq!(back.spec(), w.spec());
    }
}
