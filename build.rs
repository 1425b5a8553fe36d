//! Tells the test suite whether a PostgreSQL server is there to test the
//! PostgreSQL store against: `RUNLEDGER_PG_URL` set when the tests are
//! built turns on `cfg(runledger_pg)`. Without it, the tests of the
//! PostgreSQL store are listed as ignored, with a message that says how to
//! run them. (`.ci/run` sets it.)

fn main() {
    println!("cargo::rustc-check-cfg=cfg(runledger_pg)");
    println!("cargo::rerun-if-env-changed=RUNLEDGER_PG_URL");
    if std::env::var("RUNLEDGER_PG_URL").is_ok_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=runledger_pg");
    }
}
