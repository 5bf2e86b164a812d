%% @doc The shim as an ejabberd module, for operators who configure rather
%% than type: with the shim's ebin on ejabberd's code path
%% (ERL_OPTIONS="-pa /opt/megaphone/ebin" in /etc/default/ejabberd), a
%% drop-in /etc/ejabberd/modules.d/mod_megaphone.yml
%%
%%   modules:
%%     mod_megaphone:
%%       gc_sweep_interval: 60
%%       login_gc_interval: 1000
%%       send_busy_timeout: 15000
%%       allowed_sidecars: ["megaphone*@localhost"]
%%
%% and `ejabberdctl reload_config' start it. ejabberd starts a module once
%% per virtual host; the shim is one application for the whole node, so
%% the first host starts it and the last one to go stops it.
-module(mod_megaphone).
%% The callbacks of ejabberd's gen_mod behaviour. The -behaviour attribute
%% is left out on purpose: the shim is built without ejabberd on the code
%% path, where the compiler cannot find gen_mod and would refuse it.

-export([start/2, stop/1, reload/3, depends/2, mod_opt_type/1, mod_options/1, mod_doc/0]).

-spec start(binary(), gen_mod:opts()) -> ok | {error, term()}.
start(_Host, Opts) ->
    apply_options(Opts),
    megaphone:start().

-spec stop(binary()) -> ok.
stop(Host) ->
    case gen_mod:is_loaded_elsewhere(Host, ?MODULE) of
        true -> ok;
        %% Stopping, not unloading: ejabberd still holds this module. And
        %% from a process of its own: when ejabberd itself is stopping,
        %% this runs inside its application's stop, while the application
        %% controller waits for that to finish; a call to it from here
        %% would wait for ever.
        false -> _ = spawn(fun() -> application:stop(megaphone) end), ok
    end.

-spec reload(binary(), gen_mod:opts(), gen_mod:opts()) -> ok.
reload(_Host, NewOpts, _OldOpts) ->
    apply_options(NewOpts).

-spec depends(binary(), gen_mod:opts()) -> [{module(), hard | soft}].
depends(_Host, _Opts) ->
    %% BOSH sessions are created only on hosts where mod_bosh runs.
    [{mod_bosh, soft}].

-spec mod_opt_type(atom()) -> econf:validator().
mod_opt_type(gc_sweep_interval) -> econf:non_neg_int();
mod_opt_type(login_gc_interval) -> econf:non_neg_int();
mod_opt_type(send_busy_timeout) -> econf:non_neg_int();
mod_opt_type(allowed_sidecars) -> econf:list(econf:binary()).

-spec mod_options(binary()) -> [{atom(), term()}].
mod_options(_Host) ->
    [{gc_sweep_interval, 60},
     {login_gc_interval, 1000},
     {send_busy_timeout, 15000},
     {allowed_sidecars, [<<"*">>]}].

-spec mod_doc() -> map().
mod_doc() ->
    #{desc =>
          [<<"The Megaphone shim: lets the Megaphone sidecar, a hidden node "
             "that owns the client sockets (BOSH, XMPP over TCP/TLS, "
             "WebSocket), attach to this node and run ejabberd_bosh and "
             "ejabberd_c2s for its clients. The sidecar attaches with the "
             "node's cookie; the operator's commands are megaphone:status(), "
             "connections(), info/1, kick/1, drain(), resume(), limits/0,1 "
             "in the erl shell.">>],
      opts =>
          [{gc_sweep_interval,
            #{value => "non_neg_integer()",
              desc => <<"Seconds between sweeps that ask idle c2s processes "
                        "of sidecar streams to garbage-collect; 0 turns "
                        "sweeping off. The default is 60.">>}},
           {login_gc_interval,
            #{value => "non_neg_integer()",
              desc => <<"Milliseconds between looks at the c2s processes of "
                        "new sidecar streams: one that has just gone idle "
                        "(its client's login is done) is asked to "
                        "garbage-collect at once, rather than at the next "
                        "sweep; 0 turns it off. The default is 1000.">>}},
           {send_busy_timeout,
            #{value => "non_neg_integer()",
              desc => <<"Milliseconds a c2s write may wait while the "
                        "distribution buffer towards the sidecar is full "
                        "before the stream is closed. The default is 15000, "
                        "as ejabberd's own send_timeout for a socket.">>}},
           {allowed_sidecars,
            #{value => "[Pattern]",
              desc => <<"The sidecar nodes whose hello is taken: node-name "
                        "patterns, where * stands for any run of characters "
                        "(\"megaphone*@localhost\"). Only hidden nodes can "
                        "match; a visible cluster node never attaches as a "
                        "sidecar. The default, [\"*\"], takes any hidden "
                        "node.">>}}]}.

%% The options are node-wide (the shim is one application), so the last
%% host to set them wins; they are the same on every host in practice.
apply_options(Opts) ->
    %% Loaded first: loading would reset what set_env wrote before it.
    _ = application:load(megaphone),
    application:set_env(megaphone, gc_sweep_interval, gen_mod:get_opt(gc_sweep_interval, Opts) * 1000),
    application:set_env(megaphone, login_gc_interval, gen_mod:get_opt(login_gc_interval, Opts)),
    application:set_env(megaphone, send_busy_timeout, gen_mod:get_opt(send_busy_timeout, Opts)),
    application:set_env(megaphone, allowed_sidecars, gen_mod:get_opt(allowed_sidecars, Opts)),
    ok.
