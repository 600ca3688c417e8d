//! N data-parallel ranks with batch B/N each take the same SGD steps as one rank with batch B,
//! and every rank ends with the same weights (bit for bit).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{linear, loss, Optimizer, VarBuilder, VarMap, SGD};
use deeprepair_collective::data_parallel::{
    all_reduce_gradients, broadcast_weights, Collective, ThreadCollective,
};
use rand::{Rng, SeedableRng};

const BATCH: usize = 32;
const STEPS: usize = 6;

struct Mlp {
    l1: candle_nn::Linear,
    l2: candle_nn::Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Mlp {
            l1: linear(8, 16, vb.pp("fc1"))?,
            l2: linear(16, 3, vb.pp("fc2"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.relu()?)
    }
}

/// Deterministic data: STEPS batches of BATCH examples.
fn data() -> Vec<(Vec<f32>, Vec<u32>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..STEPS)
        .map(|_| {
            let x: Vec<f32> = (0..BATCH * 8)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let y: Vec<u32> = (0..BATCH).map(|_| rng.random_range(0..3)).collect();
            (x, y)
        })
        .collect()
}

/// Builds the model; rank 0's weights come from `seed`, other ranks start from garbage and
/// receive rank 0's by broadcast.
fn model(seed: u64) -> (VarMap, Mlp, Vec<Var>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let m = Mlp::new(vb).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in &vars {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        v.set(&Tensor::from_slice(&vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    (varmap, m, vars.into_iter().map(|(_, v)| v).collect())
}

fn weights(vars: &[Var]) -> Vec<f32> {
    vars.iter()
        .flat_map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn train(rank: usize, world: usize, mut collective: Option<ThreadCollective>) -> Vec<f32> {
    let (_map, m, vars) = model(if rank == 0 { 1 } else { 100 + rank as u64 });
    if let Some(c) = collective.as_mut() {
        broadcast_weights(c, &vars).unwrap();
    }
    let mut opt = SGD::new(vars.clone(), 0.5).unwrap();
    let shard = BATCH / world;
    for (x, y) in data() {
        let xs = Tensor::from_slice(
            &x[rank * shard * 8..(rank + 1) * shard * 8],
            (shard, 8),
            &Device::Cpu,
        )
        .unwrap();
        let ys =
            Tensor::from_slice(&y[rank * shard..(rank + 1) * shard], shard, &Device::Cpu).unwrap();
        let l = loss::cross_entropy(&m.forward(&xs).unwrap(), &ys).unwrap();
        let mut grads = l.backward().unwrap();
        if let Some(c) = collective.as_mut() {
            // Small buckets so several are exercised.
            all_reduce_gradients(c, &vars, &mut grads, 256).unwrap();
        }
        opt.step(&grads).unwrap();
    }
    weights(&vars)
}

#[test]
fn four_ranks_with_quarter_batches_match_one_rank_with_the_full_batch() {
    let single = train(0, 1, None);
    let world = 4;
    let handles: Vec<_> = ThreadCollective::group(world)
        .into_iter()
        .map(|c| {
            let rank = c.rank();
            std::thread::spawn(move || train(rank, world, Some(c)))
        })
        .collect();
    let ranks: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for r in &ranks[1..] {
        assert_eq!(r, &ranks[0], "every rank holds the same model");
    }
    let max = single
        .iter()
        .zip(&ranks[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max < 1e-5,
        "data-parallel diverged from single-rank training by {max}"
    );
    // And training did move the weights (the comparison is not vacuous).
    let (_m, _mlp, init) = model(1);
    let moved = weights(&init)
        .iter()
        .zip(&single)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-2, "weights barely moved ({moved})");
}
