/** Where jobs and the graph send events (QMP broadcasts them; tests record them). */
export interface EventSink {
  emit(event: string, data: Record<string, unknown>): void;
}

/** A sink that fans out to listeners added later (the daemon adds the QMP server). */
export class EventBus implements EventSink {
  readonly #listeners = new Set<(event: string, data: Record<string, unknown>) => void>();

  on(listener: (event: string, data: Record<string, unknown>) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  emit(event: string, data: Record<string, unknown>): void {
    for (const l of this.#listeners) l(event, data);
  }
}
