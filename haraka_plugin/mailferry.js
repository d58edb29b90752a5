// mailferry: Haraka queue plugin — spool each message durably, publish it to RabbitMQ on a
// confirm channel, and answer 250 only after the broker has confirmed it.
'use strict'

const crypto = require('node:crypto')
const path = require('node:path')
const { Writable } = require('node:stream')

const constants = require('haraka-constants')

const { SpoolWriter } = require('./spool_writer')

// All state lives on the plugin object (this.*), never at module level: Haraka may load the
// module more than once (cluster workers, tests) and each instance owns its own connection.

exports.register = function () {
  this.load_config()
  this.amqp = null // { connection, channel } while usable, null otherwise
  this.connecting = false
  this.closing = false
  this.reconnect_timer = null
  this.backoff_ms = this.cfg.amqp.reconnect_initial * 1000
  this.blocked = null // reason string while the broker blocks publishers (resource alarm)
  this.pending = new Map() // messageId -> { returned } for publishes awaiting their confirm
  this.io = null // the spool writer (group commit into segments), made on first use (spool_io)
  this.steps = new StepTimes() // where each accepted message's time went, logged at exit
  // Haraka exits without calling plugins' shutdown unless graceful_shutdown is on.
  process.once('exit', () => {
    if (this.steps.count) this.loginfo(this.steps.summary())
  })
  this.register_hook('queue', 'queue_to_rabbitmq')
  this.loginfo(`spool ${this.cfg.spool_dir}, RabbitMQ exchange ${this.cfg.amqp.exchange}`)
}

exports.load_config = function () {
  const ini = this.config.get('mailferry.ini', { booleans: [] }, () => {
    // A config reload changes names and timeouts for new messages; the live connection keeps
    // its URL until it drops (reconnecting on every edit would bounce in-flight publishes).
    this.load_config()
  })
  const amqp = ini.amqp ?? {}
  const main = ini.main ?? {}
  this.cfg = {
    spool_dir: path.resolve(String(main.spool_dir ?? 'var/spool')),
    segment_bytes: positive(main.segment_mb, 8) * 1024 * 1024,
    segment_seconds: positive(main.segment_seconds, 10),
    amqp: {
      url: String(amqp.url ?? 'amqp://guest:guest@127.0.0.1:5672/%2F'),
      exchange: String(amqp.exchange ?? 'mailferry'),
      routing_key: String(amqp.routing_key ?? 'inbound'),
      publish_timeout: positive(amqp.publish_timeout, 10),
      reconnect_initial: positive(amqp.reconnect_initial, 1),
      reconnect_max: positive(amqp.reconnect_max, 30),
      heartbeat: positive(amqp.heartbeat, 30),
    },
  }
}

function positive(value, fallback) {
  const n = Number(value)
  return Number.isFinite(n) && n > 0 ? n : fallback
}

// ── Lifecycle ────────────────────────────────────────────────────────────────────────────

// Single process: init_master runs in the one process that also takes SMTP connections.
// Cluster (smtp.ini nodes>0): the master takes no mail, so only the workers connect.
exports.hook_init_master = function (next, server) {
  if (!server?.cluster) this.connect()
  next()
}

exports.hook_init_child = function (next) {
  this.connect()
  next()
}

exports.shutdown = function () {
  this.closing = true
  this.io?.close()
  this.io = null
  clearTimeout(this.reconnect_timer)
  this.reconnect_timer = null
  const amqp = this.amqp
  this.amqp = null
  if (amqp) amqp.connection.close().catch(() => {})
}

// The one place that builds an AMQP connection; tests replace this method with a fake.
// `cfg.url` may list a cluster's nodes, separated by commas: the first that answers is used.
exports.amqp_connect = async function (cfg) {
  let failure = new Error('no RabbitMQ URL configured')
  for (const url of String(cfg.url).split(',').map((u) => u.trim()).filter(Boolean)) {
    try {
      return await connect_to(url, cfg)
    } catch (err) {
      failure = err
    }
  }
  throw failure
}

async function connect_to(url, cfg) {
  const amqplib = require('amqplib')
  const connection = await amqplib.connect(url, {
    heartbeat: cfg.heartbeat,
    clientProperties: { connection_name: `haraka mailferry pid ${process.pid}` },
  })
  try {
    const channel = await connection.createConfirmChannel()
    // Only the exchange: the consumer side declares and binds mailferry.inbound. These options
    // must match the Python declaration exactly or RabbitMQ closes the channel (406).
    await channel.assertExchange(cfg.exchange, 'direct', { durable: true })
    return { connection, channel }
  } catch (err) {
    connection.close().catch(() => {})
    throw err
  }
}

exports.connect = async function () {
  if (this.closing || this.connecting || this.amqp) return
  this.connecting = true
  try {
    const amqp = await this.amqp_connect(this.cfg.amqp)
    if (this.closing) {
      amqp.connection.close().catch(() => {})
      return
    }
    this.watch(amqp)
    this.amqp = amqp
    this.blocked = null
    this.backoff_ms = this.cfg.amqp.reconnect_initial * 1000
    this.loginfo(`connected to RabbitMQ, publishing to exchange ${this.cfg.amqp.exchange}`)
  } catch (err) {
    this.logwarn(`cannot connect to RabbitMQ: ${err.message}`)
    this.schedule_reconnect()
  } finally {
    this.connecting = false
  }
}

exports.watch = function (amqp) {
  const { connection, channel } = amqp
  // An 'error' without a listener would be rethrown and take Haraka down; the matching
  // 'close' follows and drives the reconnect.
  connection.on('error', (err) => this.logerror(`RabbitMQ connection error: ${err.message}`))
  channel.on('error', (err) => this.logerror(`RabbitMQ channel error: ${err.message}`))
  connection.on('close', (err) => this.lost(amqp, err ? err.message : 'connection closed'))
  channel.on('close', () => this.lost(amqp, 'channel closed'))
  // Publishes stall while RabbitMQ blocks publishers (memory or disk alarm): answer 4xx at
  // once instead of holding the sender for the whole publish timeout.
  connection.on('blocked', (reason) => {
    this.blocked = String(reason || 'resource alarm')
    this.logwarn(`RabbitMQ blocked publishers: ${this.blocked}`)
  })
  connection.on('unblocked', () => {
    this.blocked = null
    this.loginfo('RabbitMQ unblocked publishers')
  })
  channel.on('return', (msg) => this.on_return(msg))
}

exports.lost = function (amqp, why) {
  // Channel and connection both close on most failures; act once, for the current pair only.
  if (this.amqp !== amqp) return
  this.amqp = null
  this.logwarn(`lost RabbitMQ (${why}); reconnecting`)
  // A channel can die (e.g. 406 on the exchange) under a live connection: drop both, start clean.
  amqp.connection.close().catch(() => {})
  this.schedule_reconnect()
}

exports.schedule_reconnect = function () {
  if (this.closing || this.reconnect_timer) return
  const delay = this.backoff_ms
  this.backoff_ms = Math.min(delay * 2, this.cfg.amqp.reconnect_max * 1000)
  this.logdebug(`reconnecting to RabbitMQ in ${delay} ms`)
  this.reconnect_timer = setTimeout(() => {
    this.reconnect_timer = null
    this.connect()
  }, delay)
  // Never keep the process (or a test run) alive just to reconnect.
  this.reconnect_timer.unref?.()
}

// ── Queue hook ───────────────────────────────────────────────────────────────────────────

exports.queue_to_rabbitmq = function (next, connection) {
  const txn = connection.transaction
  // Same convention as Haraka's own queue plugins: step aside when another queue is wanted.
  const wants = txn.notes.get('queue.wants')
  if (wants && wants !== 'mailferry') return next()

  const unavailable = this.unavailable()
  if (unavailable) return next(constants.denysoft, unavailable)

  const id = path.basename(txn.uuid) // a transaction uuid never holds '/', but never trust a name
  const stamp = this.steps.start()
  let spooled = null
  this.spool(connection, id, stamp)
    // The record is in its segment (readable, not yet durable): RabbitMQ takes the job while
    // the group's fdatasync runs, two waits side by side. 250 only once both are done. A
    // crash before that leaves the sender without a 250, so it retries; a job whose record
    // did not survive whole fails its sha256 at the consumer and is dead-lettered as never
    // accepted.
    .then((record) => {
      spooled = record
      return Promise.all([
        this.publish(record.job, id).then(() => stamp.mark('confirmed')),
        record.durable.then(() => stamp.mark('durable')),
      ])
    })
    .then(
      () => {
        this.steps.done(stamp)
        this.logdebug(`published ${id} to RabbitMQ`, connection)
        next(constants.ok, `queued as ${id}`)
      },
      (err) => {
        this.logwarn(`not queued: ${err.message}`, connection)
        // The sender will retry: the sweep must never publish this record too.
        if (spooled) this.spool_io().withdraw(spooled.place, id)
        next(constants.denysoft, err.reply ?? err.message)
      },
    )
    // Only a throw inside next() lands here; an unhandled rejection would end Haraka.
    .catch((err) => this.logcrit(`queue hook failed: ${err.stack}`, connection))
}

// Why mail cannot be accepted right now, or null.
exports.unavailable = function () {
  if (!this.amqp) return 'mail queue unavailable (no connection to RabbitMQ), try again later'
  if (this.blocked) return `mail queue busy (RabbitMQ: ${this.blocked}), try again later`
  return null
}

// Read the message and append its record to the spool (spool_writer.js): one line, the
// envelope record (ENVELOPE_MARK, the job's JSON, CRLF; the job names the record's own place
// and the message's sha256), then the message, as Postfix keeps the envelope in its queue
// file: if the job is ever lost, the spool sweep republishes the true envelope (Bcc
// recipients too). Resolves once the record is written (readable by a consumer, not yet
// durable) to { job, place, durable }: the job to publish, where the record is, and the
// promise of its group's fdatasync (which rejects with the same kind of error as the other
// steps).
exports.spool = async function (connection, id, stamp = NO_STAMP) {
  let job = null
  try {
    const data = await read_message(connection.transaction.message_stream)
    stamp.mark('read')
    const sha256 = crypto.createHash('sha256').update(data).digest('hex')
    const incoming = path.join(this.cfg.spool_dir, 'incoming')
    const { place, durable } = this.spool_io().append(incoming, (where) => {
      job = this.inbound_body(connection, id, data.length, where, sha256)
      return Buffer.concat([envelope_record(job), data])
    })
    stamp.mark('written')
    const synced = durable.catch((err) => Promise.reject(spool_error(err)))
    synced.catch(() => {}) // handled by the caller's Promise.all; never an unhandled rejection
    return { job, place, durable: synced }
  } catch (err) {
    throw spool_error(err)
  }
}

function spool_error(err) {
  if (err.reply) return err
  const failure = new Error(`cannot spool message: ${err.message}`)
  // The log gets the detail; the SMTP client gets no local paths.
  failure.reply = 'mail queue cannot store the message, try again later'
  return failure
}

// The disk side of spooling: { append(folder, build), withdraw(place, id), close() }. Made on
// first use (a cluster master, which takes no mail, opens no segment); tests wrap or replace it.
exports.spool_io = function () {
  if (!this.io) {
    this.io = new SpoolWriter({ segment_bytes: this.cfg.segment_bytes, segment_seconds: this.cfg.segment_seconds })
  }
  return this.io
}

// The message as the file holds it: not its SMTP wire form. In haraka-message-stream
// `dot_stuffed: true` means "the stored lines are dot-stuffed: unstuff them" (its docs read the
// other way round; the tests pin the behaviour). CRLF as received, Haraka's Received header
// included. One Uint8Array that owns its memory, so it moves to a writer thread without a copy.
function read_message(message_stream) {
  return new Promise((resolve, reject) => {
    const chunks = []
    let size = 0
    const failed = (err) => {
      message_stream.removeListener('error', failed)
      reject(err)
    }
    const sink = new Writable({
      write(chunk, _encoding, done) {
        chunks.push(chunk)
        size += chunk.length
        done()
      },
      final(done) {
        message_stream.removeListener('error', failed)
        const data = new Uint8Array(size)
        let offset = 0
        for (const chunk of chunks) {
          data.set(chunk, offset)
          offset += chunk.length
        }
        resolve(data)
        done()
      },
    })
    message_stream.once('error', failed)
    sink.once('error', failed)
    message_stream.pipe(sink, { dot_stuffed: true, line_endings: '\r\n' })
  })
}

// Where an accepted message's time went: for each step, the mean time from the hook's start
// to its end, from hrtime stamps (well under a microsecond per message). Logged at shutdown;
// the profile in docs/BENCHMARKS.md reads it.
class StepTimes {
  constructor() {
    this.sums = new Map() // step -> total nanoseconds from the hook's start
    this.count = 0
  }

  start() {
    const t0 = process.hrtime.bigint()
    const marks = []
    return { marks, mark: (step) => marks.push([step, process.hrtime.bigint() - t0]) }
  }

  done(stamp) {
    this.count++
    for (const [step, ns] of stamp.marks) this.sums.set(step, (this.sums.get(step) ?? 0n) + ns)
  }

  summary() {
    const means = [...this.sums].map(([step, ns]) => `${step} ${(Number(ns / BigInt(this.count)) / 1e6).toFixed(2)}`)
    return `${this.count} messages accepted; mean ms from the queue hook to each step: ${means.join(', ')}`
  }
}
const NO_STAMP = { mark() {} }

// The line ahead of the message in a spool file (mailferry/spool.py reads it). JSON.stringify
// escapes CR and LF, so the record is always one line.
const ENVELOPE_MARK = 'MAILFERRY-ENVELOPE-1 '
function envelope_record(job) {
  return Buffer.from(`${ENVELOPE_MARK}${JSON.stringify(job)}\r\n`, 'utf8')
}
exports.envelope_record = envelope_record

// The mailferry.inbound contract (v1), see DESIGN.md. `size` is the message's, without the
// envelope record; `place` is the record's { spool_path, spool_offset } in its segment.
exports.inbound_body = function (connection, id, size, place, sha256) {
  const txn = connection.transaction
  return {
    v: 1,
    spool_path: place.spool_path,
    spool_offset: place.spool_offset,
    sha256,
    queue_id: id,
    mail_from: bare(txn.mail_from),
    rcpt_to: txn.rcpt_to.map(bare),
    size,
    received_at: new Date().toISOString(),
    remote_ip: connection.remote?.ip ?? '',
    helo: connection.hello?.host ?? '',
  }
}

// Bare address ("" for the null sender). @haraka/email-address 3 has a getter; older
// address-rfc2821 objects have a method.
function bare(addr) {
  if (!addr) return ''
  const a = typeof addr.address === 'function' ? addr.address() : addr.address
  return a ?? ''
}

// Resolve on the broker's ack; reject on nack, return (unroutable), timeout or a dead channel.
exports.publish = function (body, id) {
  return new Promise((resolve, reject) => {
    const unavailable = this.unavailable()
    if (unavailable) return reject(new Error(unavailable))
    const { exchange, routing_key, publish_timeout } = this.cfg.amqp

    const entry = { returned: null }
    let settled = false
    const finish = (err) => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      this.pending.delete(id)
      err ? reject(err) : resolve()
    }
    const timer = setTimeout(
      () => finish(new Error(`mail queue timeout (no confirm from RabbitMQ in ${publish_timeout} s), try again later`)),
      publish_timeout * 1000,
    )
    this.pending.set(id, entry)
    const amqp = this.amqp

    try {
      amqp.channel.publish(
        exchange,
        routing_key,
        Buffer.from(JSON.stringify(body), 'utf8'),
        { persistent: true, mandatory: true, contentType: 'application/json', messageId: id },
        (err) => {
          // amqplib: 'message nacked', or 'channel closed' for publishes the channel took down.
          if (err) {
            // A channel that nacked is not used again: on RabbitMQ 3.10 a channel opened while
            // a quorum queue elected its leader nacked every publish for minutes, until it was
            // reopened. The next connection may also reach another node of a cluster.
            if (/nack/i.test(err.message)) this.lost(amqp, 'RabbitMQ nacked a publish')
            return finish(new Error(`mail queue did not take the message (RabbitMQ: ${err.message}), try again later`))
          }
          // RabbitMQ sends basic.return before the ack of the same message, so a returned
          // message is already marked here even though it is "acked".
          if (entry.returned) return finish(new Error(`mail queue cannot route the message (${entry.returned}), try again later`))
          finish()
        },
      )
    } catch (err) {
      finish(new Error(`mail queue publish failed (${err.message}), try again later`))
    }
  })
}

exports.on_return = function (msg) {
  const id = msg?.properties?.messageId
  const entry = this.pending.get(id)
  const why = `${msg?.fields?.replyCode ?? ''} ${msg?.fields?.replyText ?? 'returned'}`.trim()
  if (entry) entry.returned = why
  this.logwarn(`RabbitMQ returned ${id}: ${why}`)
}
