// Shared test helpers: an in-process fake AMQP connection/channel at the plugin's
// amqp_connect seam, and a Haraka plugin + connection carrying a real message.
'use strict'

const assert = require('node:assert/strict')
const { EventEmitter } = require('node:events')
const crypto = require('node:crypto')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')

const { makePlugin, makeConnection } = require('haraka-test-fixtures')

const FIXTURE = path.join(__dirname, 'fixtures', 'simple.eml')

// Answers each publish the way the test asks: 'ack', 'nack', 'return' (basic.return, then the
// ack, as RabbitMQ orders them), 'close' (the channel dies first) or 'silent' (never confirms).
class FakeChannel extends EventEmitter {
  constructor() {
    super()
    this.mode = 'ack'
    this.published = []
    this.on_publish = null // optional hook(call) run synchronously inside publish()
  }

  publish(exchange, routingKey, content, options, cb) {
    const call = { exchange, routingKey, content, options, body: JSON.parse(content.toString('utf8')) }
    this.published.push(call)
    if (this.on_publish) this.on_publish(call)
    const mode = this.mode
    setImmediate(() => {
      if (mode === 'ack') cb(null)
      else if (mode === 'nack') cb(new Error('message nacked'))
      else if (mode === 'return') {
        this.emit('return', {
          fields: { replyCode: 312, replyText: 'NO_ROUTE', exchange, routingKey },
          properties: options,
          content,
        })
        cb(null)
      } else if (mode === 'close') {
        // What amqplib does when the channel goes down with unconfirmed publishes.
        cb(new Error('channel closed'))
        this.emit('close')
      }
    })
    return true
  }
}

class FakeConnection extends EventEmitter {
  constructor() {
    super()
    this.closed = false
  }

  async close() {
    if (this.closed) return
    this.closed = true
    setImmediate(() => this.emit('close'))
  }
}

// A factory for plugin.amqp_connect: fails while `broker.down` is true, counts attempts, and
// remembers the last pair it handed out.
function fakeBroker() {
  const broker = {
    down: false,
    attempts: 0,
    connection: null,
    channel: null,
    mode: 'ack',
    async connect() {
      broker.attempts++
      if (broker.down) throw new Error('connect ECONNREFUSED 127.0.0.1:5672')
      broker.connection = new FakeConnection()
      broker.channel = new FakeChannel()
      broker.channel.mode = broker.mode
      return { connection: broker.connection, channel: broker.channel }
    },
  }
  return broker
}

function tempSpool(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mailferry-spool-'))
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

// A registered plugin wired to `broker`, with fast timeouts, writing into a temp spool.
function makeMailferry(t, broker, overrides = {}) {
  const plugin = makePlugin('mailferry')
  for (const m of ['logdebug', 'loginfo', 'lognotice', 'logwarn', 'logerror', 'logcrit']) plugin[m] = () => {}
  plugin.cfg.spool_dir = tempSpool(t)
  Object.assign(plugin.cfg.amqp, { publish_timeout: 0.3, reconnect_initial: 0.01, reconnect_max: 0.04 }, overrides)
  plugin.backoff_ms = plugin.cfg.amqp.reconnect_initial * 1000
  plugin.amqp_connect = broker.connect
  t.after(() => plugin.shutdown())
  return plugin
}

// A connection whose transaction holds the fixture message exactly as Haraka stores it after
// DATA: wire lines, CRLF, dot-stuffed.
function makeMailConnection({
  mailFrom = 'sender@example.org',
  rcptTo = ['first@example.com', 'second@example.com', 'bcc-only@example.net'],
} = {}) {
  const conn = makeConnection({ ip: '192.0.2.7', helo: 'mx.example.net', mailFrom, rcptTo, silent: true })
  const txn = conn.transaction
  txn.uuid = `${crypto.randomUUID().toUpperCase()}.1`
  const raw = fs.readFileSync(FIXTURE)
  for (const line of raw.toString('binary').split(/(?<=\r\n)/)) {
    const wire = line.startsWith('.') ? `.${line}` : line
    txn.message_stream.add_line(Buffer.from(wire, 'binary'))
  }
  txn.message_stream.add_line_end()
  return conn
}

// Resolve once `predicate()` is true, polling; fail after `ms`.
async function waitFor(predicate, ms = 2000) {
  const until = Date.now() + ms
  while (!predicate()) {
    if (Date.now() > until) throw new Error('condition not reached in time')
    await new Promise((r) => setTimeout(r, 5))
  }
}

function spoolFiles(plugin) {
  const dir = path.join(plugin.cfg.spool_dir, 'incoming')
  return fs.existsSync(dir) ? fs.readdirSync(dir) : []
}

module.exports = {
  FIXTURE,
  FakeChannel,
  FakeConnection,
  fakeBroker,
  makeMailferry,
  makeMailConnection,
  spoolFiles,
  tempSpool,
  waitFor,
}

// What the spool's segments hold, read as Mailferry's spool sweep reads them: every record
// ({ job, message, segment, offset }) and every withdrawn queue id.
function spoolRecords(plugin) {
  const dir = path.join(plugin.cfg.spool_dir, 'incoming')
  const records = []
  const withdrawn = []
  for (const name of spoolFiles(plugin).filter((n) => n.endsWith('.seg')).sort()) {
    const data = fs.readFileSync(path.join(dir, name))
    let at = 0
    while (at < data.length) {
      const end = data.indexOf('\n', at)
      const line = data.subarray(at, end + 1).toString('utf8')
      if (line.startsWith('MAILFERRY-WITHDRAWN-1 ')) {
        withdrawn.push(line.slice('MAILFERRY-WITHDRAWN-1 '.length).trim())
        at = end + 1
        continue
      }
      assert.ok(line.startsWith('MAILFERRY-ENVELOPE-1 '), `a record at ${name}@${at}`)
      const job = JSON.parse(line.slice('MAILFERRY-ENVELOPE-1 '.length))
      const message = data.subarray(end + 1, end + 1 + job.size)
      records.push({ job, message, segment: name, offset: at })
      at = end + 1 + job.size
    }
  }
  return { records, withdrawn }
}

module.exports.spoolRecords = spoolRecords
