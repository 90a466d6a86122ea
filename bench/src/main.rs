//! `twokey-bench`: see the library for what it measures.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = twokey_bench::Options::parse();
    let report = twokey_bench::run(&opts).await?;
    if let Some(path) = &opts.json_file {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
