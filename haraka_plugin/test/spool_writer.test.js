// The spool writer: records placed and appended on the event loop, made durable in groups by
// its thread, against a real folder; its durability step in-thread with `fs` observed.
'use strict'

const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')
const { describe, it } = require('node:test')

const { SpoolWriter, make_durable } = require('../spool_writer')
const { tempSpool } = require('./helpers')

function writer(t, options) {
  const w = new SpoolWriter(options)
  t.after(() => w.close())
  return w
}

function incoming(t) {
  return path.join(tempSpool(t), 'incoming')
}

// A record that names its own place, as the plugin's envelope line does.
const record = (label) => (place) => Buffer.from(`${label}@${place.spool_path}@${place.spool_offset}\n`)

function segments(folder) {
  return fs.readdirSync(folder).filter((n) => n.endsWith('.seg')).sort()
}

describe('spool writer', () => {
  it('places each record at the end of the segment and writes it there at once', async (t) => {
    const folder = incoming(t)
    const w = writer(t)
    const a = w.append(folder, record('a'))
    const b = w.append(folder, record('b'))
    const [name] = segments(folder) // created with the first record (and its folder)
    const text = fs.readFileSync(path.join(folder, name), 'utf8') // readable before any sync
    const second = text.indexOf('\n') + 1
    assert.equal(text, `a@incoming/${name}@0\nb@incoming/${name}@${second}\n`)
    assert.deepEqual([a.place.spool_offset, b.place.spool_offset], [0, second])
    await Promise.all([a.durable, b.durable])
  })

  it('syncs the records appended while one fdatasync runs as one group', async (t) => {
    const folder = incoming(t)
    const w = writer(t)
    const first = w.append(folder, record('first')) // its group starts at once
    const rest = Array.from({ length: 20 }, (_, n) => w.append(folder, record(`r${n}`)))
    await Promise.all([first, ...rest].map((r) => r.durable))
    assert.equal(w.seq, 2, 'one fdatasync for the first, one for the twenty that waited')
  })

  it('starts a new segment when one is full or old, and never reuses a name', async (t) => {
    const folder = incoming(t)
    const w = writer(t, { segment_bytes: 40, segment_seconds: 0.05 })
    const places = []
    for (let n = 0; n < 4; n++) places.push(w.append(folder, record(`n${n}`)).place.spool_path)
    await new Promise((r) => setTimeout(r, 80))
    places.push(w.append(folder, record('late')).place.spool_path)
    assert.ok(new Set(places).size >= 3, places.join(' '))
    assert.equal(segments(folder).length, new Set(places).size)
    await new Promise((r) => setTimeout(r, 20))
    assert.equal(w.retired.length, 0, 'retired segments are closed once synced')
  })

  it('abandons a segment whose write failed: the next record starts a new one', async (t) => {
    const folder = incoming(t)
    const w = writer(t)
    const ok = w.append(folder, record('ok'))
    const real = fs.writeSync
    t.mock.method(fs, 'writeSync', (fd, buf, off, len) => {
      real(fd, buf, off, Math.min(len, 3)) // a torn write
      throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' })
    })
    assert.throws(() => w.append(folder, record('torn')), { code: 'ENOSPC' })
    t.mock.restoreAll()
    const next = w.append(folder, record('next'))
    assert.notEqual(next.place.spool_path, ok.place.spool_path)
    assert.equal(next.place.spool_offset, 0)
    await Promise.all([ok.durable, next.durable])
  })

  it('rejects the group and abandons its segment when the fdatasync fails', async (t) => {
    const folder = incoming(t)
    const w = writer(t)
    const real_finish = SpoolWriter.prototype.finish
    t.mock.method(w, 'finish', function () {
      return real_finish.call(this, Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }))
    })
    const a = w.append(folder, record('a'))
    await assert.rejects(a.durable, { code: 'EIO' })
    t.mock.restoreAll()
    const b = w.append(folder, record('b'))
    assert.notEqual(b.place.spool_path, a.place.spool_path)
    await b.durable
  })

  it('writes a withdrawal after the record, in its own segment even when that one is retired', async (t) => {
    const folder = incoming(t)
    const w = writer(t, { segment_bytes: 10 })
    const a = w.append(folder, record('a'))
    const b = w.append(folder, record('b')) // a's segment is full: b starts another
    await Promise.all([a.durable, b.durable])
    w.withdraw(a.place, 'QA')
    w.withdraw(b.place, 'QB')
    const text = (p) => fs.readFileSync(path.join(folder, path.basename(p.spool_path)), 'utf8')
    assert.match(text(a.place), /\nMAILFERRY-WITHDRAWN-1 QA\r\n$/)
    assert.match(text(b.place), /\nMAILFERRY-WITHDRAWN-1 QB\r\n$/)
  })

  it('places the next record after a withdrawal line in the current segment', async (t) => {
    const folder = incoming(t)
    const w = writer(t)
    const a = w.append(folder, record('a'))
    w.withdraw(a.place, 'QA')
    const c = w.append(folder, record('c'))
    const file = path.join(folder, path.basename(a.place.spool_path))
    const data = fs.readFileSync(file)
    assert.equal(c.place.spool_path, a.place.spool_path)
    assert.equal(data.subarray(c.place.spool_offset).toString(), `c@${c.place.spool_path}@${c.place.spool_offset}\n`)
    assert.match(data.subarray(0, c.place.spool_offset).toString(), /\nMAILFERRY-WITHDRAWN-1 QA\r\n$/)
    await Promise.all([a.durable, c.durable])
  })

  it('starts a new segment when the current one was removed from the folder', async (t) => {
    const folder = incoming(t)
    const w = writer(t)
    const a = w.append(folder, record('a'))
    await a.durable
    fs.rmSync(folder, { recursive: true })
    const b = w.append(folder, record('b'))
    await b.durable
    assert.notEqual(b.place.spool_path, a.place.spool_path)
    assert.deepEqual(segments(folder), [path.basename(b.place.spool_path)])
  })

  it('fails what waits and refuses new records once closed', async (t) => {
    const folder = incoming(t)
    const w = new SpoolWriter()
    const a = w.append(folder, record('a'))
    w.close()
    await assert.rejects(a.durable, /closed/)
    assert.throws(() => w.append(folder, record('b')), /closed/)
  })
})

describe('spool writer durability step', () => {
  it('fdatasyncs each segment of the group, then fsyncs the folder when a segment is new', (t) => {
    const folder = incoming(t)
    fs.mkdirSync(folder, { recursive: true })
    const fds = ['a.seg', 'b.seg'].map((n) => fs.openSync(path.join(folder, n), 'ax'))
    t.after(() => fds.forEach((fd) => fs.closeSync(fd)))
    const calls = []
    const real = { fdatasyncSync: fs.fdatasyncSync, fsyncSync: fs.fsyncSync }
    for (const name of Object.keys(real)) {
      t.mock.method(fs, name, (fd) => {
        calls.push([name, fd])
        return real[name](fd)
      })
    }
    make_durable(fds, folder)
    assert.deepEqual(calls.slice(0, 2), [['fdatasyncSync', fds[0]], ['fdatasyncSync', fds[1]]])
    assert.equal(calls[2][0], 'fsyncSync') // the folder, through its own descriptor
    assert.equal(calls.length, 3)
    calls.length = 0
    make_durable(fds, null)
    assert.deepEqual(calls.map((c) => c[0]), ['fdatasyncSync', 'fdatasyncSync'])
  })
})
