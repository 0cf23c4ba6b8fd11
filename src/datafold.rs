//! What the gateway reads from Datafold's answers, as typed facts.
//!
//! The upstream service parses each answer it forwards once, into an [`Answered`] left in the
//! response's extensions. The layers that need it read it there, each for its own purpose and
//! without knowing about the other: the job layer remembers which caller started which job, and
//! the audit layer records the upstream status, the job and the test's outcome. Only the fields
//! those need are read; the answer itself reaches the caller unchanged.

use serde::{Deserialize, Serialize};

/// What Datafold answered to one forwarded request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answered {
    /// The HTTP status of Datafold's answer.
    pub status: u16,
    /// The job a test start (`POST .../test`, 200) began.
    pub job_id: Option<i64>,
    /// A result poll's (`GET .../test/{job_id}`, 200) status and steps.
    pub test: Option<TestResult>,
}

/// A connection test's result, as a poll of it reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestResult {
    /// The job status, as Datafold wrote it (`done`, `failed`, ...).
    pub status: Box<str>,
    /// The status of each step, in Datafold's order; empty when the answer listed none.
    pub steps: TestSteps,
}

/// The status of each step of a connection test, in Datafold's order; audited as an object,
/// `{"connection": "done", "temp_schema": "failed"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestSteps(pub Vec<(Box<str>, Box<str>)>);

impl Serialize for TestSteps {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (step, status) in &self.0 {
            map.serialize_entry(step, status)?;
        }
        map.end()
    }
}

/// The body of a test start, as Datafold answers it.
#[derive(Deserialize)]
struct TestStarted {
    job_id: i64,
}

/// The body of a result poll, as Datafold answers it; only what the gateway needs.
#[derive(Deserialize)]
struct TestResults {
    status: Box<str>,
    #[serde(default)]
    results: Vec<TestStep>,
}

#[derive(Deserialize)]
struct TestStep {
    step: Box<str>,
    status: Box<str>,
}

impl Answered {
    /// Reads Datafold's answer `body` (status `status`) to a test start (`started_test`) or to
    /// a result poll. Only a 200 is read; a body that is not what the API documents leaves the
    /// fields `None`, never an error: the caller gets the answer as it was either way.
    pub fn read(started_test: bool, status: u16, body: &[u8]) -> Self {
        let mut answered = Self {
            status,
            ..Self::default()
        };
        if status != 200 {
            return answered;
        }
        if started_test {
            answered.job_id = serde_json::from_slice::<TestStarted>(body)
                .ok()
                .map(|t| t.job_id);
        } else if let Ok(results) = serde_json::from_slice::<TestResults>(body) {
            answered.test = Some(TestResult {
                status: results.status,
                steps: TestSteps(
                    results
                        .results
                        .into_iter()
                        .map(|step| (step.step, step.status))
                        .collect(),
                ),
            });
        }
        answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_start_gives_its_job_id() {
        let answered = Answered::read(true, 200, br#"{"job_id": 7}"#);
        assert_eq!(answered.job_id, Some(7));
        assert_eq!(answered.test, None);
    }

    #[test]
    fn a_poll_gives_its_status_and_steps_in_order() {
        let body = br#"{"status": "failed", "results": [
            {"step": "connection", "status": "done"},
            {"step": "temp_schema", "status": "failed", "result": {"error": "denied"}}]}"#;
        let test = Answered::read(false, 200, body).test.unwrap();
        assert_eq!(&*test.status, "failed");
        assert_eq!(
            serde_json::to_string(&test.steps).unwrap(),
            r#"{"connection":"done","temp_schema":"failed"}"#
        );
    }

    #[test]
    fn only_a_well_formed_200_is_read() {
        assert_eq!(Answered::read(true, 500, br#"{"job_id": 7}"#).job_id, None);
        assert_eq!(Answered::read(true, 200, b"<html>").job_id, None);
        let answered = Answered::read(false, 404, br#"{"status": "done"}"#);
        assert_eq!((answered.status, answered.test), (404, None));
    }
}
