%% @doc The virtual socket ejabberd_c2s runs on for a sidecar connection: a
%% transport module in ranch's sense, implementing xmpp_socket's callbacks
%% (send_xml/2, get_owner/1, get_transport/1, change_shaper/2,
%% controlling_process/2, close/1, sockname/1, peername/1, setopts/2,
%% get_peer_certificate/2, plus reset_stream/1, which c2s calls too).
%%
%% Element mode: get_owner/1 is the sidecar's process, not c2s itself, so
%% c2s parses nothing; the sidecar sends it parsed elements as
%% {tcp, megaphone, [Event]} and writes what send_xml/2 hands it back as
%% XML. c2s monitors the owner, so when the sidecar goes away every c2s it
%% fed ends by itself.
%%
%% Nothing here blocks: writes are asynchronous sends to the sidecar with
%% nosuspend, so a slow or dead sidecar cannot stall a c2s process. If the
%% distribution buffer towards the sidecar stays full for longer than
%% send_busy_timeout, the write fails and c2s closes the stream, rather
%% than dropping a stanza silently; every later write on that socket fails
%% too, so nothing written after the lost stanza reaches the client.
-module(megaphone_c2s_socket).

-export([new/5, conn_id/1]).
-export([send_xml/2, send/2, get_owner/1, get_transport/1, change_shaper/2,
         controlling_process/2, close/1, sockname/1, peername/1, setopts/2,
         get_peer_certificate/2, reset_stream/1]).

-record(msock, {sidecar :: pid(),
                id :: non_neg_integer(),
                transport :: transport(),
                peer :: endpoint(),
                local :: endpoint()}).

%% http_bind: a BOSH session kept by the sidecar (XEP-0124/0206), c2s
%% behaving as under ejabberd_bosh (its session's connection type).
-type transport() :: tcp | tls | websocket | http_bind.
-type endpoint() :: {inet:ip_address(), inet:port_number()}.
-opaque socket() :: #msock{}.
-export_type([socket/0, transport/0]).

%% @doc A socket for connection ConnId of the sidecar.
-spec new(pid(), non_neg_integer(), transport(), endpoint(), endpoint()) -> socket().
new(Sidecar, ConnId, Transport, Peer, Local) ->
    #msock{sidecar = Sidecar, id = ConnId, transport = Transport, peer = Peer, local = Local}.

%% @doc The sidecar's connection ID.
-spec conn_id(socket()) -> non_neg_integer().
conn_id(#msock{id = Id}) -> Id.

%% @doc One stream event from c2s, on its way to the client.
-spec send_xml(socket(), term()) -> ok | {error, closed | overloaded}.
send_xml(#msock{sidecar = Sidecar, id = Id}, El) ->
    write(Sidecar, Id, {c2s_out, Id, El}).

%% @doc Raw bytes (c2s only sends these in raw mode; kept for completeness).
-spec send(socket(), iodata()) -> ok | {error, closed | overloaded}.
send(#msock{sidecar = Sidecar, id = Id}, Data) ->
    write(Sidecar, Id, {c2s_out, Id, {xmlstreamraw, iolist_to_binary(Data)}}).

%% @doc The sidecar's process: c2s monitors it.
-spec get_owner(socket()) -> pid().
get_owner(#msock{sidecar = Sidecar}) -> Sidecar.

-spec get_transport(socket()) -> transport().
get_transport(#msock{transport = T}) -> T.

%% @doc The shaper is enforced where the bytes are read, in the sidecar.
-spec change_shaper(socket(), term()) -> ok.
change_shaper(#msock{sidecar = Sidecar, id = Id}, Shaper) ->
    _ = to_sidecar(Sidecar, {c2s_shaper, Id, shaper_rate(Shaper)}),
    ok.

-spec controlling_process(socket(), pid()) -> ok.
controlling_process(_Socket, _Pid) -> ok.

%% @doc c2s is done with the stream: the sidecar closes the client socket.
-spec close(socket()) -> ok.
close(#msock{sidecar = Sidecar, id = Id}) ->
    _ = to_sidecar(Sidecar, {c2s_close, Id}),
    ok.

-spec sockname(socket()) -> {ok, endpoint()}.
sockname(#msock{local = Local}) -> {ok, Local}.

-spec peername(socket()) -> {ok, endpoint()}.
peername(#msock{peer = Peer}) -> {ok, Peer}.

%% @doc The sidecar pushes elements as they come; there is nothing to arm.
-spec setopts(socket(), list()) -> ok.
setopts(_Socket, _Opts) -> ok.

%% @doc TLS ends in the sidecar; client certificates are not passed on.
-spec get_peer_certificate(socket(), plain | otp | der) -> error.
get_peer_certificate(_Socket, _Type) -> error.

%% @doc The sidecar's parser takes a restarted stream header as it comes.
-spec reset_stream(socket()) -> socket().
reset_stream(Socket) -> Socket.

%% Once a write has failed, every later write on the socket fails the same
%% way, as on a gen_tcp socket an error closed. c2s does not stop at a
%% failed write: it queues its own close and goes on with its mailbox, so
%% without this a stanza written a moment later, once the link has room
%% again, would reach the client with the failed one missing. The mark is
%% kept in the writing process's dictionary (c2s's own: the socket is a
%% value c2s copies, it has no state of its own to keep it in).
write(Sidecar, Id, Msg) ->
    Mark = {?MODULE, write_failed, Sidecar, Id},
    case get(Mark) of
        undefined ->
            case to_sidecar(Sidecar, Msg) of
                ok -> ok;
                {error, _} = Failed -> put(Mark, Failed), Failed
            end;
        Failed -> Failed
    end.

%% The distribution buffer towards the sidecar is shared by every stream it
%% carries, so "busy" says the link is momentarily full (one client's burst
%% can fill it), not that this client is slow: the sidecar reads the link
%% without ever waiting on a client. So a busy send is retried with a short
%% backoff for at most send_busy_timeout ms, and only then fails and closes
%% the stream, as gen_tcp's send waits on a full socket for ejabberd's
%% send_timeout. The default is that option's own, 15 s, and not shorter:
%% while other streams' bursts fill the link, every c2s that writes retries
%% at once and a quiet stream's write may lose the race for seconds (a
%% 200 MB flood into slow readers, TestFloodIntoSlowClientsStaysBounded,
%% kept a bystander waiting past 1 s). A sidecar that is really gone
%% answers noconnect at once.
to_sidecar(Sidecar, Msg) ->
    case erlang:send(Sidecar, Msg, [noconnect, nosuspend]) of
        ok -> ok;
        nosuspend -> retry_busy(Sidecar, Msg, 1, busy_deadline());
        noconnect -> {error, closed}
    end.

retry_busy(Sidecar, Msg, Backoff, Deadline) ->
    Now = erlang:monotonic_time(millisecond),
    case Now >= Deadline of
        true -> {error, overloaded};
        false ->
            %% A bare `after` consumes nothing from c2s's mailbox.
            receive after min(Backoff, Deadline - Now) -> ok end,
            case erlang:send(Sidecar, Msg, [noconnect, nosuspend]) of
                ok -> ok;
                nosuspend -> retry_busy(Sidecar, Msg, min(Backoff * 2, 50), Deadline);
                noconnect -> {error, closed}
            end
    end.

busy_deadline() ->
    Timeout = case application:get_env(megaphone, send_busy_timeout) of
                  {ok, T} when is_integer(T), T >= 0 -> T;
                  _ -> 15000
              end,
    erlang:monotonic_time(millisecond) + Timeout.

%% p1_shaper keeps its rate in a record; we pass on only bytes per second.
shaper_rate(none) -> none;
shaper_rate(Shaper) when is_tuple(Shaper), tuple_size(Shaper) >= 2,
                         is_integer(element(2, Shaper)) -> element(2, Shaper);
shaper_rate(_) -> none.
