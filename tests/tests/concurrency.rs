//! One loaded model run from many threads at once: each run gives the bits it gives alone.
//!
//! A server shares one `Model` between its request threads. The runtime's thread pool serves
//! one inference at a time (the others run their ops on their own thread), the integer path
//! caches the last quantized activations, and JIT code and AMX tile state are shared or per
//! thread: none of it may leak between concurrent runs.

use std::sync::Arc;
use tcc_compiler::driver::{self, BuildOptions};
use tcc_runtime::{Model, Tensor};
use tcc_tests::support::{fixtures, scratch};

/// Different inputs per request (lengths 5 to 40, other token ids), as a server sees them.
fn request(m: &Model, i: usize) -> Vec<(String, Tensor)> {
    m.random_inputs(1 + i % 2, 5 + (i * 7) % 36, i as u64).unwrap()
}

fn stress(name: &str, quantize: bool) {
    let f = fixtures();
    let dir = scratch("concurrency");
    let art = dir.join(format!("{name}-{quantize}.tcc"));
    let mut opts = BuildOptions::default();
    if quantize {
        opts.quantize = Some(tcc_passes::Activations::Dynamic(tcc_runtime::op::fused::ActQuant::DynamicRow));
    }
    driver::build(&f.model(name).path, &art, &opts).unwrap();
    let m = Arc::new(Model::load(&art).unwrap());
    let requests = 12;
    // Alone, one after the other.
    let alone: Vec<Vec<(String, Tensor)>> = (0..requests).map(|i| m.run(&request(&m, i)).unwrap()).collect();
    // Eight threads at once, each going through every request in its own order, three times.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for round in 0..3 {
                    for j in 0..requests {
                        let i = (j * (t + 1) + round) % requests;
                        got.push((i, m.run(&request(&m, i)).unwrap()));
                    }
                }
                got
            })
        })
        .collect();
    for (t, h) in threads.into_iter().enumerate() {
        for (i, out) in h.join().expect("no thread panics") {
            for ((n, a), (_, b)) in out.iter().zip(&alone[i]) {
                assert_eq!(a.shape(), b.shape(), "{name} thread {t} request {i} `{n}`");
                let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{name} (int8: {quantize}) thread {t} request {i} `{n}`: not the bits of the run alone"
                );
            }
        }
    }
}

#[test]
fn f32_minilm_from_eight_threads_is_bit_identical() {
    stress("minilm_l6", false);
}

#[test]
fn int8_minilm_from_eight_threads_is_bit_identical() {
    stress("minilm_l6", true);
}
