// spool_writer: the spool's disk work, done in worker threads.
//
// Why threads: Haraka serves every SMTP session from one event loop, and under load that loop
// is the bottleneck (docs/BENCHMARKS.md, "SMTP ingest"). Written with fs promises, a spool
// file costs the loop five round trips through libuv's pool (open, write, fsync, close,
// rename), each a callback and a promise. Here the loop hands a worker the message in one
// postMessage and gets one reply; the worker makes the same system calls synchronously, in
// the same order, with nothing else to do meanwhile.
//
// The steps themselves (write_file, sync_folder) are plain synchronous functions exported for
// tests, which run them in-thread with `fs` mocked.
'use strict'

const fs = require('node:fs')
const path = require('node:path')
const { Worker, isMainThread, parentPort } = require('node:worker_threads')

// ── The steps (run inside a worker) ──────────────────────────────────────────────────────

// Write <folder>/.<id>.tmp, fsync it, close it and rename it to <id>.eml; return its size. The
// folder is created when it is missing (first message, or removed under a running Haraka).
// On any failure the temporary file is removed and the error thrown: nothing half-written
// stays behind, and no .eml exists unless its content was fsynced first.
function write_file(folder, id, data) {
  const tmp = path.join(folder, `.${id}.tmp`)
  let fd = null
  try {
    fd = open_exclusive(folder, tmp)
    let offset = 0
    while (offset < data.length) offset += fs.writeSync(fd, data, offset, data.length - offset)
    fs.fsyncSync(fd)
    fs.closeSync(fd)
    fd = null
    fs.renameSync(tmp, path.join(folder, `${id}.eml`))
    return data.length
  } catch (err) {
    if (fd !== null) ignore(() => fs.closeSync(fd))
    ignore(() => fs.rmSync(tmp, { force: true }))
    throw err
  }
}

function open_exclusive(folder, tmp) {
  try {
    return fs.openSync(tmp, 'wx', 0o600)
  } catch (err) {
    if (err.code !== 'ENOENT') throw err
    fs.mkdirSync(folder, { recursive: true, mode: 0o700 })
    return fs.openSync(tmp, 'wx', 0o600)
  }
}

// fsync a folder: makes the renames done in it before this call durable.
function sync_folder(folder) {
  const fd = fs.openSync(folder, 'r')
  try {
    fs.fsyncSync(fd)
  } finally {
    fs.closeSync(fd)
  }
}

function ignore(step) {
  try {
    step()
  } catch {
    // best effort: the error being reported matters more than a failed cleanup
  }
}

const STEPS = { write_file, sync_folder }

function serve(port) {
  port.on('message', ({ seq, step, args }) => {
    try {
      port.postMessage({ seq, value: STEPS[step](...args) })
    } catch (err) {
      port.postMessage({ seq, error: { message: err.message, code: err.code } })
    }
  })
}

if (!isMainThread && parentPort) serve(parentPort)

// ── The pool (on Haraka's event loop) ────────────────────────────────────────────────────

// A few workers, each doing one step at a time; a step goes to the least busy one. Several
// workers let concurrent fsyncs reach the disk together (ext4 commits them in one journal
// transaction) while each worker stays a simple sequence of system calls.
class SpoolWriter {
  constructor(threads) {
    this.threads = Math.max(1, Math.floor(threads) || 1)
    this.workers = [] // { worker, pending: Map(seq -> { resolve, reject }) }
    this.seq = 0
    this.closed = false
  }

  // Resolves to the file's size once <folder>/<id>.eml holds `data`, fsynced. `data` (a
  // Uint8Array owning its buffer) is handed to the worker without a copy: do not reuse it.
  write(folder, id, data) {
    return this.run('write_file', [folder, id, data], [data.buffer])
  }

  sync_folder(folder) {
    return this.run('sync_folder', [folder], [])
  }

  close() {
    this.closed = true
    const workers = this.workers
    this.workers = []
    for (const slot of workers) {
      fail_all(slot, new Error('spool writer closed'))
      slot.worker.terminate()
    }
  }

  run(step, args, transfer) {
    if (this.closed) return Promise.reject(new Error('spool writer closed'))
    const slot = this.least_busy()
    const seq = ++this.seq
    return new Promise((resolve, reject) => {
      slot.pending.set(seq, { resolve, reject })
      if (slot.pending.size === 1) slot.worker.ref() // keep the process up while a step runs
      slot.worker.postMessage({ seq, step, args }, transfer)
    })
  }

  least_busy() {
    if (this.workers.length < this.threads) return this.spawn()
    let best = this.workers[0]
    for (const slot of this.workers) if (slot.pending.size < best.pending.size) best = slot
    return best
  }

  spawn() {
    const slot = { worker: new Worker(__filename), pending: new Map() }
    slot.worker.unref() // an idle writer never keeps Haraka (or a test run) alive
    slot.worker.on('message', ({ seq, value, error }) => {
      const job = slot.pending.get(seq)
      if (!job) return
      slot.pending.delete(seq)
      if (slot.pending.size === 0) slot.worker.unref()
      if (error) job.reject(Object.assign(new Error(error.message), { code: error.code }))
      else job.resolve(value)
    })
    // A worker that dies (it should not: every step catches) fails its steps and is replaced
    // by the next call; its messages get 4xx and are retried by their senders.
    const lost = (err) => {
      this.workers = this.workers.filter((s) => s !== slot)
      fail_all(slot, new Error(`spool writer thread ended: ${err?.message ?? 'exited'}`))
    }
    slot.worker.on('error', lost)
    slot.worker.on('exit', () => lost(null))
    this.workers.push(slot)
    return slot
  }
}

function fail_all(slot, err) {
  const jobs = [...slot.pending.values()]
  slot.pending.clear()
  for (const job of jobs) job.reject(err)
}

module.exports = { SpoolWriter, write_file, sync_folder }
