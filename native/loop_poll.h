/* Adaptive polling of the event loop (loop_poll.c): registers loopPollStart, loopPollStop and
 * loopPollStats on the addon's exports. */
#ifndef DRIVETAP_LOOP_POLL_H
#define DRIVETAP_LOOP_POLL_H
#include <node_api.h>

void loop_poll_register(napi_env env, napi_value exports);

#endif
