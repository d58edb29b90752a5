// The spool writer: its steps run in-thread with `fs` mocked (order of the system calls, cleanup
// on failure), and its worker threads against a real folder.
'use strict'

const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')
const { describe, it } = require('node:test')

const { SpoolWriter, write_file, sync_folder } = require('../spool_writer')
const { tempSpool } = require('./helpers')

const MESSAGE = Buffer.from('Subject: hi\r\n\r\n.leading dot kept as is\r\n')

// Record fs calls by name (and the file they touch), calling through to the real ones.
function recordFs(t) {
  const calls = []
  const names = new Map() // fd -> basename of what it was opened for
  const real = {}
  for (const name of ['openSync', 'writeSync', 'fsyncSync', 'closeSync', 'renameSync', 'mkdirSync', 'rmSync']) {
    real[name] = fs[name]
    t.mock.method(fs, name, (...args) => {
      const result = real[name](...args)
      if (name === 'openSync') names.set(result, path.basename(args[0]))
      const what = typeof args[0] === 'number' ? names.get(args[0]) : path.basename(args[0])
      calls.push(name === 'renameSync' ? `${name} ${what} ${path.basename(args[1])}` : `${name} ${what}`)
      return result
    })
  }
  return { calls, real }
}

describe('spool writer steps', () => {
  it('writes the temporary file, fsyncs and closes it, then renames it', (t) => {
    const folder = path.join(tempSpool(t), 'incoming')
    fs.mkdirSync(folder)
    const { calls } = recordFs(t)
    assert.equal(write_file(folder, 'ID.1', new Uint8Array(MESSAGE)), MESSAGE.length)
    assert.deepEqual(calls.filter((c) => !c.startsWith('writeSync')), [
      'openSync .ID.1.tmp', 'fsyncSync .ID.1.tmp', 'closeSync .ID.1.tmp', 'renameSync .ID.1.tmp ID.1.eml',
    ])
    assert.ok(calls.indexOf('writeSync .ID.1.tmp') > 0 && calls.indexOf('writeSync .ID.1.tmp') < 2, calls.join(', '))
    assert.deepEqual(fs.readFileSync(path.join(folder, 'ID.1.eml')), MESSAGE)
    assert.deepEqual(fs.readdirSync(folder), ['ID.1.eml'])
  })

  it('finishes a short write with further writes', (t) => {
    const folder = tempSpool(t)
    const realWrite = fs.writeSync
    t.mock.method(fs, 'writeSync', (fd, data, offset, length) => realWrite(fd, data, offset, Math.min(length, 7)))
    write_file(folder, 'short', new Uint8Array(MESSAGE))
    assert.deepEqual(fs.readFileSync(path.join(folder, 'short.eml')), MESSAGE)
  })

  it('creates a missing folder', (t) => {
    const folder = path.join(tempSpool(t), 'incoming')
    write_file(folder, 'first', new Uint8Array(MESSAGE))
    assert.deepEqual(fs.readdirSync(folder), ['first.eml'])
  })

  it('removes the temporary file and leaves no .eml when a step fails', (t) => {
    const folder = tempSpool(t)
    for (const failing of ['writeSync', 'fsyncSync', 'renameSync']) {
      const real = fs[failing]
      t.mock.method(fs, failing, () => {
        throw Object.assign(new Error(`EIO: i/o error, ${failing}`), { code: 'EIO' })
      })
      assert.throws(() => write_file(folder, failing, new Uint8Array(MESSAGE)), { code: 'EIO' })
      fs[failing].mock.restore()
      assert.equal(fs[failing], real)
      assert.deepEqual(fs.readdirSync(folder), [], `after a failed ${failing}`)
    }
  })

  it('never replaces an existing temporary file', (t) => {
    const folder = tempSpool(t)
    fs.writeFileSync(path.join(folder, '.dup.tmp'), 'someone else')
    assert.throws(() => write_file(folder, 'dup', new Uint8Array(MESSAGE)), { code: 'EEXIST' })
    assert.deepEqual(fs.readdirSync(folder), [], 'the failed attempt removed the name it could not own')
  })

  it('fsyncs a folder through a read-only descriptor and closes it', (t) => {
    const folder = tempSpool(t)
    const { calls } = recordFs(t)
    sync_folder(folder)
    const name = path.basename(folder)
    assert.deepEqual(calls, [`openSync ${name}`, `fsyncSync ${name}`, `closeSync ${name}`])
  })
})

describe('spool writer threads', () => {
  it('writes files in worker threads, several at once, and reports sizes', async (t) => {
    const folder = path.join(tempSpool(t), 'incoming')
    const writer = new SpoolWriter(3)
    t.after(() => writer.close())
    const sizes = await Promise.all(Array.from({ length: 20 }, (_, i) => {
      const data = new Uint8Array(Buffer.from(`Subject: ${i}\r\n\r\nbody ${i}\r\n`))
      return writer.write(folder, `m${i}`, data)
    }))
    await writer.sync_folder(folder)
    assert.equal(writer.workers.length, 3)
    assert.equal(fs.readdirSync(folder).length, 20)
    for (let i = 0; i < 20; i++) {
      const text = fs.readFileSync(path.join(folder, `m${i}.eml`), 'utf8')
      assert.equal(text, `Subject: ${i}\r\n\r\nbody ${i}\r\n`)
      assert.equal(sizes[i], text.length)
    }
  })

  it('rejects with the error and its code when a step fails', async (t) => {
    const writer = new SpoolWriter(1)
    t.after(() => writer.close())
    const blocker = path.join(tempSpool(t), 'a-file')
    fs.writeFileSync(blocker, '')
    await assert.rejects(writer.write(path.join(blocker, 'incoming'), 'x', new Uint8Array(3)), { code: 'ENOTDIR' })
    await assert.rejects(writer.sync_folder(path.join(blocker, 'missing')), { code: 'ENOTDIR' })
    // The thread is still serving after a failure.
    const folder = tempSpool(t)
    assert.equal(await writer.write(folder, 'after', new Uint8Array(3)), 3)
  })

  it('fails the steps of a thread that ends, and starts a new one for the next', async (t) => {
    const writer = new SpoolWriter(1)
    t.after(() => writer.close())
    const folder = tempSpool(t)
    assert.equal(await writer.write(folder, 'before', new Uint8Array(3)), 3)
    const [first] = writer.workers
    const pending = writer.write(folder, 'cut', new Uint8Array(1024 * 1024))
    first.worker.terminate()
    await assert.rejects(pending, /spool writer thread ended/)
    assert.equal(await writer.write(folder, 'after', new Uint8Array(5)), 5)
    assert.equal(writer.workers.length, 1)
    assert.notEqual(writer.workers[0], first)
  })

  it('fails pending steps and refuses new ones once closed', async (t) => {
    const writer = new SpoolWriter(1)
    const folder = tempSpool(t)
    const pending = writer.write(folder, 'late', new Uint8Array(1024 * 1024))
    writer.close()
    await assert.rejects(pending, /spool writer closed/)
    await assert.rejects(writer.write(folder, 'next', new Uint8Array(1)), /spool writer closed/)
  })
})
