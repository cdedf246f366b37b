/**
 * QMP errors: the error classes QEMU answers with, and the one place that turns whatever a command
 * handler threw into the `{"class", "desc"}` pair on the wire.
 */
import { BlockError } from "../core/errors.js";

export type QmpErrorClass =
  "GenericError" | "CommandNotFound" | "DeviceNotFound" | "DeviceNotActive" | "KVMMissingCap";

/** An error a QMP command reports to its client, as QEMU would word and classify it. */
export class QmpError extends Error {
  readonly errorClass: QmpErrorClass;
  constructor(errorClass: QmpErrorClass, desc: string, options?: { cause?: unknown }) {
    super(desc, options);
    this.name = "QmpError";
    this.errorClass = errorClass;
  }
}

/**
 * Maps anything a handler threw to a QmpError. QEMU reports block-layer failures as GenericError with
 * the message text, so a BlockError's code does not change the class.
 */
export function qmpErrorFrom(err: unknown): QmpError {
  if (err instanceof QmpError) return err;
  if (err instanceof BlockError) return new QmpError("GenericError", err.message, { cause: err });
  const message = err instanceof Error ? err.message : String(err);
  return new QmpError("GenericError", message, { cause: err });
}
