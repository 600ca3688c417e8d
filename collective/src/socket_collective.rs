//! The CPU backend of [`Collective`] for ranks in different processes (or machines): TCP in a
//! star around rank 0. Rank 0 listens; every other rank connects once and sends each
//! collective's buffer; rank 0 combines them exactly as [`crate::data_parallel::ThreadCollective`]
//! does (rank-ordered sum, then division by the world size) and sends the result back, so a
//! gang of processes takes bit-identical steps to a gang of threads.
//!
//! No crate fits: MPI bindings need an MPI installation, and gloo/torch.distributed have no
//! Rust port. A star costs rank 0 `2·(world−1)` buffer transfers per collective, which is
//! fine for the few CPU ranks one host runs; GPUs use NCCL instead.
//!
//! Failure: a rank that fails (or is killed) closes its socket; the others read EOF and fail
//! with [`GroupAborted`]. Reads poll a cancel flag every 200 ms, so a rank whose peer froze
//! (SIGSTOP) still stops when its stage is cancelled.

use crate::data_parallel::{mean_in_rank_order, Collective, GroupAborted};
use anyhow::{bail, Context};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ALL_REDUCE: u8 = 1;
const BROADCAST: u8 = 2;
const OK: u8 = 0;
const MISMATCH: u8 = 1;
/// How long rank 0 waits for the others to connect.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(200);

/// One rank's end of a TCP group.
pub struct SocketCollective {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1.. in rank order; other ranks: the stream to rank 0.
    peers: Vec<TcpStream>,
    cancel: Arc<AtomicBool>,
    aborted: bool,
}

impl SocketCollective {
    /// Forms the group: rank 0 listens on `address` and publishes it (with a secret the
    /// others must present) through `exchange`, which gives every rank all ranks' payloads
    /// in rank order (e.g. [`deeprepair_pipeline::Gang::exchange`]); the others connect.
    pub fn join(
        rank: usize,
        world: usize,
        address: IpAddr,
        exchange: impl FnOnce(&[u8]) -> anyhow::Result<Vec<Vec<u8>>>,
        cancel: Arc<AtomicBool>,
    ) -> anyhow::Result<SocketCollective> {
        if rank >= world {
            bail!("rank {rank} outside a world of {world}");
        }
        let mut group = SocketCollective {
            rank,
            world,
            peers: vec![],
            cancel,
            aborted: false,
        };
        if rank == 0 {
            let listener = TcpListener::bind(SocketAddr::new(address, 0))
                .with_context(|| format!("rank 0 cannot listen on {address}"))?;
            let secret = crate::unguessable_hex()?;
            let payload = format!("{} {secret}", listener.local_addr()?);
            exchange(payload.as_bytes())?;
            group.peers = group.accept_ranks(&listener, secret.as_bytes())?;
        } else {
            let payloads = exchange(&[])?;
            let first = payloads
                .first()
                .context("the gang exchange returned no payloads")?;
            let text = std::str::from_utf8(first).context("rank 0's address is not text")?;
            let (addr, secret) = text
                .split_once(' ')
                .context("rank 0's payload is not `address secret`")?;
            let addr: SocketAddr = addr.parse().context("rank 0's address")?;
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
                .with_context(|| format!("rank {rank} cannot reach rank 0 at {addr}"))?;
            stream.set_nodelay(true)?;
            let mut hello = secret.as_bytes().to_vec();
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            stream.write_all(&hello)?;
            group.peers = vec![stream];
            let mut ack = [0u8; 1];
            group.read_from(0, &mut ack)?;
        }
        for s in &group.peers {
            s.set_read_timeout(Some(POLL))?;
        }
        Ok(group)
    }

    /// Rank 0: accepts one connection per other rank, each proving it knows `secret`.
    fn accept_ranks(
        &self,
        listener: &TcpListener,
        secret: &[u8],
    ) -> anyhow::Result<Vec<TcpStream>> {
        listener.set_nonblocking(true)?;
        let mut slots: Vec<Option<TcpStream>> = (1..self.world).map(|_| None).collect();
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while slots.iter().any(Option::is_none) {
            if self.cancel.load(Ordering::Relaxed) {
                bail!("cancelled while waiting for the other ranks to connect");
            }
            if Instant::now() > deadline {
                let missing: Vec<usize> =
                    (1..self.world).filter(|r| slots[r - 1].is_none()).collect();
                bail!("ranks {missing:?} did not connect to rank 0 within {JOIN_TIMEOUT:?}");
            }
            let (mut stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e).context("rank 0 accepting a rank"),
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut hello = vec![0u8; secret.len() + 4];
            // A stranger (or a stale rank of an earlier attempt) is dropped, not trusted.
            if stream.read_exact(&mut hello).is_err()
                || !crate::same_secret(&hello[..secret.len()], secret)
            {
                continue;
            }
            let r = u32::from_le_bytes(hello[secret.len()..].try_into().expect("4 bytes")) as usize;
            if r == 0 || r >= self.world || slots[r - 1].is_some() {
                continue;
            }
            stream.set_nodelay(true)?;
            stream.write_all(&[OK])?;
            slots[r - 1] = Some(stream);
        }
        Ok(slots
            .into_iter()
            .map(|s| s.expect("all connected"))
            .collect())
    }

    /// Reads exactly `buf` from peer `i`, polling the cancel flag; EOF means that rank failed.
    fn read_from(&mut self, i: usize, buf: &mut [u8]) -> anyhow::Result<()> {
        let peer_rank = if self.rank == 0 { i + 1 } else { 0 };
        let mut filled = 0;
        while filled < buf.len() {
            match self.peers[i].read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(anyhow::Error::new(GroupAborted)
                        .context(format!("rank {peer_rank} closed its connection")))
                }
                Ok(n) => filled += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if self.cancel.load(Ordering::Relaxed) {
                        bail!("cancelled while waiting for rank {peer_rank}");
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(anyhow::Error::new(GroupAborted)
                        .context(format!("reading from rank {peer_rank}: {e}")))
                }
            }
        }
        Ok(())
    }

    fn write_to(&mut self, i: usize, bytes: &[u8]) -> anyhow::Result<()> {
        self.peers[i].write_all(bytes).map_err(|e| {
            let peer_rank = if self.rank == 0 { i + 1 } else { 0 };
            anyhow::Error::new(GroupAborted).context(format!("writing to rank {peer_rank}: {e}"))
        })
    }

    /// One collective: `op` with `root`; rank 0 combines the rank-ordered buffers.
    fn round(
        &mut self,
        op: u8,
        root: usize,
        buffer: &mut [f32],
        combine: impl Fn(&[Vec<f32>]) -> Vec<f32>,
    ) -> anyhow::Result<()> {
        if self.aborted {
            return Err(GroupAborted.into());
        }
        let result = self.round_inner(op, root, buffer, combine);
        if result.is_err() {
            self.abort();
        }
        result
    }

    fn round_inner(
        &mut self,
        op: u8,
        root: usize,
        buffer: &mut [f32],
        combine: impl Fn(&[Vec<f32>]) -> Vec<f32>,
    ) -> anyhow::Result<()> {
        let head = header(op, root, buffer.len());
        if self.rank != 0 {
            let mut message = head.to_vec();
            message.extend(buffer.iter().flat_map(|v| v.to_le_bytes()));
            self.write_to(0, &message)?;
            let mut status = [0u8; 1];
            self.read_from(0, &mut status)?;
            if status[0] != OK {
                bail!(
                    "the ranks called different collectives, or with buffers of different lengths"
                );
            }
            let mut bytes = vec![0u8; buffer.len() * 4];
            self.read_from(0, &mut bytes)?;
            decode_into(&bytes, buffer);
            return Ok(());
        }
        let mut parts = vec![buffer.to_vec()];
        let mut mismatch = None;
        for i in 0..self.peers.len() {
            let mut theirs = [0u8; 13];
            self.read_from(i, &mut theirs)?;
            let len = u64::from_le_bytes(theirs[5..].try_into().expect("8 bytes")) as usize;
            let mut bytes = vec![0u8; len * 4];
            self.read_from(i, &mut bytes)?;
            if theirs != head && mismatch.is_none() {
                mismatch = Some(format!(
                    "rank {} called {} with {len} values, rank 0 {} with {}",
                    i + 1,
                    op_name(theirs[0]),
                    op_name(op),
                    buffer.len()
                ));
            }
            let mut values = vec![0f32; len];
            decode_into(&bytes, &mut values);
            parts.push(values);
        }
        if let Some(why) = mismatch {
            for i in 0..self.peers.len() {
                let _ = self.peers[i].write_all(&[MISMATCH]);
            }
            bail!("collective mismatch: {why}");
        }
        let result = combine(&parts);
        let mut reply = vec![OK];
        reply.extend(result.iter().flat_map(|v| v.to_le_bytes()));
        for i in 0..self.peers.len() {
            self.write_to(i, &reply)?;
        }
        buffer.copy_from_slice(&result);
        Ok(())
    }
}

impl Collective for SocketCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> anyhow::Result<()> {
        // The thread backend's arithmetic, so both give the same bits.
        self.round(ALL_REDUCE, 0, buffer, mean_in_rank_order)
    }
    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> anyhow::Result<()> {
        if root >= self.world {
            bail!("broadcast root {root} outside a world of {}", self.world);
        }
        self.round(BROADCAST, root, buffer, |parts| parts[root].clone())
    }
    fn abort(&mut self) {
        self.aborted = true;
        for s in &self.peers {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn header(op: u8, root: usize, len: usize) -> [u8; 13] {
    let mut h = [0u8; 13];
    h[0] = op;
    h[1..5].copy_from_slice(&(root as u32).to_le_bytes());
    h[5..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

fn op_name(op: u8) -> &'static str {
    match op {
        ALL_REDUCE => "all-reduce",
        BROADCAST => "broadcast",
        _ => "an unknown collective",
    }
}

fn decode_into(bytes: &[u8], out: &mut [f32]) {
    for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_parallel::{is_group_aborted, ThreadCollective};
    use std::sync::mpsc;

    /// An in-memory stand-in for the coordinator's exchange: rank 0's payload to everyone.
    fn group(world: usize) -> Vec<SocketCollective> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (tx, rx) = (tx.clone(), rx.clone());
                std::thread::spawn(move || {
                    SocketCollective::join(
                        rank,
                        world,
                        "127.0.0.1".parse().unwrap(),
                        |payload| {
                            if rank == 0 {
                                for _ in 1..world {
                                    tx.send(payload.to_vec()).unwrap();
                                }
                                Ok(vec![payload.to_vec()])
                            } else {
                                Ok(vec![rx.lock().unwrap().recv().unwrap()])
                            }
                        },
                        Arc::new(AtomicBool::new(false)),
                    )
                    .unwrap()
                })
            })
            .collect();
        let mut group: Vec<SocketCollective> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        group.sort_by_key(|c| c.rank);
        group
    }

    fn run_ranks<T: Send + 'static>(
        ranks: Vec<impl Collective + 'static>,
        body: impl Fn(&mut dyn Collective) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut c| {
                let body = body.clone();
                std::thread::spawn(move || body(&mut c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn sockets_give_the_bits_of_the_thread_backend() {
        // Values whose float sums depend on the order: both backends must agree exactly.
        let body = |c: &mut dyn Collective| {
            let mut out = vec![];
            for round in 0..20 {
                let mut buf: Vec<f32> = (0..1000)
                    .map(|i| {
                        ((i * 7919 + c.rank() * 104729 + round) % 1013) as f32 * 1e-3
                            + 1e4 * (c.rank() as f32 - 1.0)
                    })
                    .collect();
                c.all_reduce_mean(&mut buf).unwrap();
                out.push(buf);
                let mut b = vec![c.rank() as f32 + 0.5; 3];
                c.broadcast(&mut b, 2).unwrap();
                assert_eq!(b, vec![2.5; 3]);
            }
            out
        };
        let sockets = run_ranks(group(3), body);
        let threads = run_ranks(ThreadCollective::group(3), body);
        for r in 0..3 {
            assert_eq!(sockets[r], threads[r], "rank {r}");
            assert_eq!(sockets[r], sockets[0]);
        }
    }

    #[test]
    fn a_rank_that_goes_away_fails_the_others() {
        let mut ranks = group(3);
        let gone = ranks.pop().unwrap();
        // Goes away while the others wait in a collective.
        let leaving = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(gone);
        });
        let waiting = run_ranks(ranks, |c: &mut dyn Collective| {
            let err = c.all_reduce_mean(&mut [1.0]).unwrap_err();
            (is_group_aborted(&err), format!("{err:#}"))
        });
        leaving.join().unwrap();
        // Rank 0 reads rank 2's EOF; rank 1 is then released by rank 0's abort.
        for (aborted, message) in waiting {
            assert!(aborted, "{message}");
        }
    }

    #[test]
    fn mismatched_collectives_fail_every_rank() {
        let results = run_ranks(group(2), |c: &mut dyn Collective| {
            let mut buf = vec![0.0; 2 + c.rank()];
            c.all_reduce_mean(&mut buf).map_err(|e| format!("{e:#}"))
        });
        assert!(results[0]
            .as_ref()
            .unwrap_err()
            .contains("rank 1 called all-reduce with 3 values"));
        assert!(results[1].is_err());
    }

    #[test]
    fn a_cancelled_rank_stops_waiting_for_a_frozen_peer() {
        let mut ranks = group(2);
        let frozen = ranks.pop().unwrap(); // never calls, never closes
        let cancel = ranks[0].cancel.clone();
        let mut rank0 = ranks.pop().unwrap();
        let waiter = std::thread::spawn(move || rank0.all_reduce_mean(&mut [1.0]).unwrap_err());
        std::thread::sleep(Duration::from_millis(300));
        cancel.store(true, Ordering::Relaxed);
        let err = waiter.join().unwrap();
        assert!(format!("{err:#}").contains("cancelled"), "{err:#}");
        drop(frozen);
    }

    #[test]
    fn strangers_are_not_admitted() {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let rank0 = std::thread::spawn(move || {
            SocketCollective::join(
                0,
                2,
                "127.0.0.1".parse().unwrap(),
                |p| {
                    tx.send(p.to_vec()).unwrap();
                    Ok(vec![p.to_vec()])
                },
                Arc::new(AtomicBool::new(false)),
            )
        });
        let payload = rx.recv().unwrap();
        let text = String::from_utf8(payload.clone()).unwrap();
        let addr = text.split_once(' ').unwrap().0.to_string();
        // Wrong secret: dropped.
        let mut stranger = TcpStream::connect(&addr).unwrap();
        stranger.write_all(&[0u8; 36]).unwrap();
        let mut ack = [0u8; 1];
        assert_eq!(stranger.read(&mut ack).unwrap_or(0), 0);
        // The real rank 1 is then admitted.
        let rank1 = SocketCollective::join(
            1,
            2,
            "127.0.0.1".parse().unwrap(),
            |_| Ok(vec![payload]),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        let rank0 = rank0.join().unwrap().unwrap();
        let results = run_ranks(vec![rank0, rank1], |c: &mut dyn Collective| {
            let mut b = vec![c.rank() as f32 * 2.0];
            c.all_reduce_mean(&mut b).unwrap();
            b[0]
        });
        assert_eq!(results, vec![1.0, 1.0]);
    }
}
