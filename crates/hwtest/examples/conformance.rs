//! Run the conformance kernel by hand and print the per-scenario tables:
//!
//! ```text
//! cargo run -p hwtest --example conformance            # every configuration
//! cargo run -p hwtest --example conformance -- qemu    # some: qemu, bochs, bochs-noad
//! ```
//!
//! Exits 0 when every emulator that ran passed (a missing emulator is
//! reported as SKIP), 1 otherwise.

use hwtest::{Emulator, Error, matrix, run_conformance};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let emus: Vec<Emulator> = if args.is_empty() {
        Emulator::ALL.to_vec()
    } else {
        match args.iter().map(|a| a.parse()).collect::<Result<Vec<_>, _>>() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        }
    };
    let results: Vec<_> = emus.iter().map(|&e| (e, run_conformance(e))).collect();
    let mut ok = true;
    for (emu, r) in &results {
        match r {
            Ok(rep) => {
                println!("{}", rep.table());
                ok &= rep.passed();
            }
            Err(Error::Missing(why)) => println!("== {emu}: SKIP: {why}\n"),
            Err(e) => {
                println!("== {emu}: ERROR: {e}\n");
                ok = false;
            }
        }
    }
    println!("{}", matrix(&results));
    std::process::exit(if ok { 0 } else { 1 });
}
