// spool_writer: the spool's disk work, as group commit into append-only segments.
//
// Why: on two cores the durable path cost the plugin half of Haraka's throughput, and a
// profile (docs/BENCHMARKS.md, "SMTP ingest") put most of it in the kernel: a file created,
// fsynced and renamed per message, plus a folder fsync. Now each message's record is
// appended to the current segment (`incoming/<name>.seg`) at once, and the messages appended
// while one fdatasync runs share the next one (plus one folder fsync when a segment is new).
// A group is synced as soon as the one before it is durable, so groups form by themselves:
// one message when the server is quiet, many under load, and no timer ever waits.
//
// The append is a write(2) into the page cache on the event loop (a few microseconds: the
// file is open, nothing is created or renamed), so the record can be read by a consumer at
// once and its job published while the fdatasync runs. Only the fdatasync, which waits for
// the disk, runs in the writer thread. The event loop owns the segments' names and sizes, so
// a record's place (segment, offset) is known before it is written and goes into the record
// itself and into the job. A segment is never rewritten: after a failed write it is
// abandoned, and the next record starts a new one. Segments are removed by Mailferry's spool
// sweep once every message in them is stored.
'use strict'

const fs = require('node:fs')
const path = require('node:path')
const { Worker, isMainThread, parentPort } = require('node:worker_threads')

const WITHDRAWN_MARK = 'MAILFERRY-WITHDRAWN-1 '

// ── The writer thread: fdatasync, and fsync of the folder ───────────────────────────────

// One fdatasync per segment descriptor (contents and size), one folder fsync when a segment
// is new (its name). After this every record appended before the call survives a crash.
// Descriptors are the process's, shared by its threads.
function make_durable(fds, folder) {
  for (const fd of fds) fs.fdatasyncSync(fd)
  if (folder) sync_folder(folder)
}

function sync_folder(folder) {
  const fd = fs.openSync(folder, 'r')
  try {
    fs.fsyncSync(fd)
  } finally {
    fs.closeSync(fd)
  }
}

function serve(port) {
  port.on('message', ({ seq, fds, folder }) => {
    try {
      make_durable(fds, folder)
      port.postMessage({ seq })
    } catch (err) {
      port.postMessage({ seq, error: { message: err.message, code: err.code } })
    }
  })
}

if (!isMainThread && parentPort) serve(parentPort)

// ── The segments and the group commit (on Haraka's event loop) ───────────────────────────

function open_segment(folder, name) {
  const file = path.join(folder, name)
  try {
    return fs.openSync(file, 'ax', 0o600) // O_EXCL: never an existing file
  } catch (err) {
    if (err.code !== 'ENOENT') throw err
    fs.mkdirSync(folder, { recursive: true, mode: 0o700 }) // first message, or removed meanwhile
    return fs.openSync(file, 'ax', 0o600)
  }
}

function write_all(fd, bytes) {
  let offset = 0
  while (offset < bytes.length) offset += fs.writeSync(fd, bytes, offset, bytes.length - offset)
}

function close_quietly(fd) {
  try {
    fs.closeSync(fd)
  } catch {
    // a descriptor we are done with
  }
}

class SpoolWriter {
  // segment_bytes / segment_seconds: a segment takes no new records once it is this large or
  // this old (the sweep can remove it only then).
  constructor({ segment_bytes = 8 * 1024 * 1024, segment_seconds = 10 } = {}) {
    this.segment_bytes = segment_bytes
    this.segment_ms = segment_seconds * 1000
    this.segment = null // { folder, name, fd, size, opened } the segment records go to
    this.counter = 0
    this.waiting = [] // the next group: { segment, resolve, reject } per record
    this.syncing = null // the group whose fdatasync runs
    this.retired = [] // segments that take no more records, closed once nothing syncs them
    this.worker = null
    this.seq = 0
    this.closed = false
  }

  // Append the record `build(place)` returns (a Uint8Array, given its place: { spool_path,
  // spool_offset }) to the current segment in `folder`. Returns { place, durable }: `durable`
  // resolves after the fdatasync that covers it. Throws when the record cannot be written.
  append(folder, build) {
    if (this.closed) throw new Error('spool writer closed')
    const segment = this.current(folder)
    const place = { spool_path: `incoming/${segment.name}`, spool_offset: segment.size }
    const bytes = build(place)
    try {
      write_all(segment.fd, bytes)
    } catch (err) {
      this.abandon(segment) // where its end is, is unknown now
      throw err
    }
    segment.size += bytes.length
    const durable = new Promise((resolve, reject) => this.waiting.push({ segment, resolve, reject }))
    this.kick()
    return { place: { ...place, folder }, durable }
  }

  // The record at `place` was answered 4xx after it was written: a line after it in its
  // segment says so, so the sweep never publishes it (its sender sends it again). Best
  // effort, not synced: a crash that loses it can at worst store a message twice that its
  // sender also sent again.
  withdraw(place, queue_id) {
    if (this.closed || !place) return
    const line = Buffer.from(`${WITHDRAWN_MARK}${queue_id}\r\n`, 'utf8')
    const name = path.basename(place.spool_path)
    const segment = this.segment?.name === name ? this.segment : null
    try {
      if (segment) {
        write_all(segment.fd, line)
        segment.size += line.length
      } else {
        fs.appendFileSync(path.join(place.folder, name), line) // an older segment
      }
    } catch {
      if (segment) this.abandon(segment)
    }
  }

  close() {
    this.closed = true
    const waiting = [...(this.syncing ?? []), ...this.waiting]
    this.waiting = []
    this.syncing = null
    for (const record of waiting) record.reject(new Error('spool writer closed'))
    this.worker?.terminate()
    this.worker = null
    for (const segment of [this.segment, ...this.retired]) if (segment) close_quietly(segment.fd)
    this.segment = null
    this.retired = []
  }

  // The segment new records go to: a new one when there is none, or it is full or old, or
  // its name was removed (a record written there would be lost with the last descriptor).
  current(folder) {
    const now = Date.now()
    const s = this.segment
    if (s && s.folder === folder && s.size < this.segment_bytes && now - s.opened < this.segment_ms &&
        fs.fstatSync(s.fd).nlink > 0) return s
    if (s) this.retire(s)
    // Unique across Haraka's processes and restarts: time, pid, a counter.
    const name = `${now.toString(36)}-${process.pid}-${++this.counter}.seg`
    this.segment = { folder, name, fd: open_segment(folder, name), size: 0, opened: now, fresh: true }
    return this.segment
  }

  retire(segment) {
    if (this.segment === segment) this.segment = null
    this.retired.push(segment)
    this.close_retired()
  }

  abandon(segment) {
    this.retire(segment)
  }

  // Close what takes no records and has no fdatasync pending or running.
  close_retired() {
    const busy = new Set([...(this.syncing ?? []), ...this.waiting].map((r) => r.segment))
    this.retired = this.retired.filter((segment) => {
      if (busy.has(segment)) return true
      close_quietly(segment.fd)
      return false
    })
  }

  // Sync the waiting records as one group, unless a group's fdatasync still runs.
  kick() {
    if (this.syncing || !this.waiting.length || this.closed) return
    const group = this.waiting
    this.waiting = []
    this.syncing = group
    const segments = [...new Set(group.map((r) => r.segment))]
    const fresh = segments.filter((s) => s.fresh)
    for (const s of fresh) s.fresh = false
    const worker = this.thread()
    worker.ref() // keep the process up while a group is on its way to the disk
    worker.postMessage({ seq: ++this.seq, fds: segments.map((s) => s.fd), folder: fresh.length ? fresh[0].folder : null })
  }

  thread() {
    if (this.worker) return this.worker
    const worker = new Worker(__filename)
    worker.unref() // an idle writer never keeps Haraka (or a test run) alive
    worker.on('message', ({ seq, error }) => {
      if (seq === this.seq) this.finish(error ? Object.assign(new Error(error.message), { code: error.code }) : null)
    })
    // A thread that dies (it should not: the step catches) fails its group, whose senders get
    // 4xx and retry; the next group starts a new thread.
    const lost = (err) => {
      if (this.worker !== worker) return
      this.worker = null
      this.finish(new Error(`spool writer thread ended: ${err?.message ?? 'exited'}`))
    }
    worker.on('error', lost)
    worker.on('exit', () => lost(null))
    this.worker = worker
    return worker
  }

  // The syncing group is durable, or its fdatasync failed (then its segments are abandoned:
  // after a failed fdatasync Linux may have dropped the pages, so what is on disk is unknown).
  finish(err) {
    const group = this.syncing ?? []
    this.syncing = null
    if (err) for (const segment of new Set(group.map((r) => r.segment))) this.abandon(segment)
    for (const record of group) err ? record.reject(err) : record.resolve()
    this.close_retired()
    if (!this.waiting.length) this.worker?.unref()
    this.kick()
  }
}

module.exports = { SpoolWriter, WITHDRAWN_MARK, make_durable, sync_folder }
